"""An open-loop HTTP/1.1 load generator cheap enough to drive a loopback server at 1,000 calls/s
on a 2-core machine.

httpx's AsyncClient spends about 1.5 ms of CPU per call (measured against ``loadtest.upstream`` at
200 and 500 calls/s), so from a few hundred calls/s an httpx generator measured itself rather than
the server. Here a call is one write and a ``data_received`` callback or two on a plain
``asyncio.Protocol`` (about 0.2 ms of CPU at 1,000 calls/s): the request is validated once, h11
parses the responses (Content-Length, chunked and close-delimited bodies alike), and only the
status and the end time are kept.

Connections are HTTP/1.1 keep-alive, one request in flight on each, opened on demand up to a cap
and reused; a call that cannot get one within its time-out fails like any other time-out.

Per call it keeps the time to the first byte of the response body as well (for a server-sent event
stream: the first event, i.e. the time to first token) and, for the run, how many calls were in
flight. A ``Post`` may vary its body per call (a fixed-width counter in place of a marker), so a
server's exact-match cache never answers in the upstream's place."""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import h11

from loadtest.bench.common import open_loop


@dataclass(frozen=True)
class Post:
    """One POST request, validated by h11 once and sent as is by every call."""

    host: str
    port: int
    request: h11.Request
    body: h11.Data
    # Replaced in each call's body by that call's number, zero-padded to the marker's width (b"": none).
    marker: bytes = b""

    @classmethod
    def json(cls, url: str, body: bytes, headers: dict[str, str] | None = None, marker: bytes = b"") -> Post:
        """A POST of the JSON document ``body`` to ``url`` (http only: the benchmarks run on loopback).
        With ``marker`` (which must occur in ``body``), call n sends ``body`` with the marker replaced by
        n, zero-padded to the marker's width (so every body has the same length)."""
        if marker and marker not in body:
            raise ValueError(f"the marker {marker!r} is not in the body")
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"not a plain http:// URL: {url!r}")
        port = parts.port or 80
        all_headers = {
            "Host": parts.netloc,
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **(headers or {}),
        }
        request = h11.Request(method="POST", target=parts.path or "/", headers=list(all_headers.items()))
        return cls(parts.hostname, port, request, h11.Data(data=body), marker)

    def body_for(self, n: int) -> h11.Data:
        """The body of call ``n``."""
        if not self.marker:
            return self.body
        number = str(n % 10 ** len(self.marker)).zfill(len(self.marker)).encode()
        return h11.Data(data=bytes(self.body.data).replace(self.marker, number))


R = TypeVar("R")


class H11Exchange(asyncio.Protocol, Generic[R], abc.ABC):
    """One keep-alive HTTP/1.1 connection carrying one exchange at a time, h11 parsing the response.

    A subclass keeps what it needs of each response through the hooks (``_begin``, ``_on_response``,
    ``_on_data``, ``_result``): the benchmark's ``_Connection`` only the status and the first body
    byte's time, the replay's (loadtest/http_exchange.py) the whole answer.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._http = h11.Connection(our_role=h11.CLIENT)
        self._reply: asyncio.Future[R] | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, request: h11.Request, body: h11.Data) -> asyncio.Future[R]:
        """Send one request; the future is the subclass's ``_result`` once the whole response arrived."""
        assert self._transport is not None
        self._reply = asyncio.get_running_loop().create_future()
        self._begin()
        self._transport.write(self._http.send(request) + self._http.send(body) + self._http.send(h11.EndOfMessage()))
        return self._reply

    def data_received(self, data: bytes) -> None:
        self._http.receive_data(data)
        self._read_events()

    def eof_received(self) -> bool:
        # A body delimited by the connection closing ends here; anything else is cut short.
        self._http.receive_data(b"")
        self._read_events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(exc or ConnectionResetError("connection closed before the response ended"))

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()

    def _read_events(self) -> None:
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc)
                self.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                self._on_response(event)
            elif isinstance(event, h11.Data):
                self._on_data(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._end_exchange()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._fail(ConnectionResetError("connection closed before the response ended"))
                self.close()
                return

    def _end_exchange(self) -> None:
        if self._http.our_state is h11.DONE and self._http.their_state is h11.DONE:
            self._http.start_next_cycle()
        else:  # the server asked to close (Connection: close, HTTP/1.0)
            self.close()
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(self._result())

    def _fail(self, exc: BaseException) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(exc)

    def _begin(self) -> None:
        """A new exchange starts: forget the last response."""

    def _on_response(self, response: h11.Response) -> None:
        """The status line and headers arrived."""

    def _on_data(self, data: bytes | bytearray | memoryview) -> None:
        """A piece of the body arrived."""

    @abc.abstractmethod
    def _result(self) -> R:
        """What the exchange's future resolves to, once the whole response arrived."""


class _Connection(H11Exchange[tuple[int, float]]):
    """The benchmark's connection: keeps only the status and the first body byte's time."""

    def _begin(self) -> None:
        self._status = 0
        self._first_byte = 0.0

    def _on_response(self, response: h11.Response) -> None:
        self._status = response.status_code

    def _on_data(self, data: bytes | bytearray | memoryview) -> None:
        if not self._first_byte and data:
            self._first_byte = time.perf_counter()

    def _result(self) -> tuple[int, float]:
        return self._status, self._first_byte

    def exchange(self, post: Post, body: h11.Data) -> asyncio.Future[tuple[int, float]]:
        """Send ``post`` with ``body``; the future is the response's status and the perf_counter time
        its first body byte arrived (0.0: an empty body), once the whole body has arrived."""
        return self.send(post.request, body)


class Client:
    """Sends one ``Post`` per ``call()`` over a pool of at most ``max_connections`` connections."""

    def __init__(self, post: Post, max_connections: int) -> None:
        self._post = post
        # Connections are only opened when none is idle, so with at most this many calls holding
        # one at a time, no more than this many are ever open.
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._sent = 0

    async def call(self) -> tuple[int, float]:
        """The response's status and the perf_counter time of its first body byte (0.0: none);
        raises OSError or h11's errors when the exchange fails. Calls are numbered in the order
        they get a connection (the number a varying ``Post`` puts in the body)."""
        async with self._slots:
            connection = await self._connection()
            body = self._post.body_for(self._sent)
            self._sent += 1
            try:
                reply = await connection.exchange(self._post, body)
            except BaseException:  # a time-out too: the reply may still come, so the connection is spent
                connection.close()
                raise
            if connection.open:
                self._idle.append(connection)
            return reply

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.open:  # not closed by the server while idle
                return connection
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, self._post.host, self._post.port)
        return connection

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


@dataclass(frozen=True)
class Run:
    """One open-loop run: a latency per call (None: failed, timed out or not 200), and its timing."""

    latencies_ms: list[float | None]
    span_s: float  # from the first send to the last one
    wall_s: float  # from the first send to the last answer
    # Per call, from its start to the first byte of the response body (for a server-sent event
    # stream: the first event); None where latencies_ms is None or the body was empty.
    first_byte_ms: list[float | None] = field(default_factory=list)
    # Calls started and not yet ended, seen by each call as it starts (itself included): mean, max.
    in_flight_mean: float = 0.0
    in_flight_max: int = 0


async def drive(post: Post, rate_per_s: float, count: int, timeout_s: float, max_connections: int = 2000) -> Run:
    """Start call i at i / rate seconds whatever earlier calls do; each has ``timeout_s`` in all
    (waiting for a connection included)."""
    latencies: list[float | None] = [None] * count
    first_bytes: list[float | None] = [None] * count
    client = Client(post, max_connections)
    in_flight = 0
    in_flight_seen = 0
    in_flight_max = 0

    async def call(i: int) -> None:
        nonlocal in_flight, in_flight_seen, in_flight_max
        in_flight += 1
        in_flight_seen += in_flight
        in_flight_max = max(in_flight_max, in_flight)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                status, first_byte = await client.call()
        except (TimeoutError, OSError, h11.ProtocolError):
            return
        finally:
            in_flight -= 1
        if status == 200:
            latencies[i] = (time.perf_counter() - start) * 1000
            if first_byte:
                first_bytes[i] = (first_byte - start) * 1000

    started = time.monotonic()
    try:
        span = await open_loop(rate_per_s, count, call)
    finally:
        client.close()
    return Run(
        latencies,
        span,
        time.monotonic() - started,
        first_bytes,
        in_flight_seen / count if count else 0.0,
        in_flight_max,
    )
