"""An open-loop HTTP/1.1 load generator cheap enough to drive a loopback server at 1,000 calls/s
on a 2-core machine.

httpx's AsyncClient spends about 1.5 ms of CPU per call (measured against ``loadtest.upstream`` at
200 and 500 calls/s), so from a few hundred calls/s an httpx generator measured itself rather than
the server. Here a call is one write and a ``data_received`` callback or two on a plain
``asyncio.Protocol`` (about 0.2 ms of CPU at 1,000 calls/s): the request is validated once, h11
parses the responses (Content-Length, chunked and close-delimited bodies alike), and only the
status and the end time are kept.

Connections are HTTP/1.1 keep-alive, one request in flight on each, opened on demand up to a cap
and reused; a call that cannot get one within its time-out fails like any other time-out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
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

    @classmethod
    def json(cls, url: str, body: bytes, headers: dict[str, str] | None = None) -> Post:
        """A POST of the JSON document ``body`` to ``url`` (http only: the benchmarks run on loopback)."""
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
        return cls(parts.hostname, port, request, h11.Data(data=body))


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one exchange at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._http = h11.Connection(our_role=h11.CLIENT)
        self._status = 0
        self._reply: asyncio.Future[int] | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def exchange(self, post: Post) -> asyncio.Future[int]:
        """Send ``post``; the future is the response's status once the whole body has arrived."""
        assert self._transport is not None
        self._reply = asyncio.get_running_loop().create_future()
        self._transport.write(
            self._http.send(post.request) + self._http.send(post.body) + self._http.send(h11.EndOfMessage())
        )
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
                self._status = event.status_code
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
            self._reply.set_result(self._status)

    def _fail(self, exc: BaseException) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(exc)


class Client:
    """Sends one ``Post`` per ``call()`` over a pool of at most ``max_connections`` connections."""

    def __init__(self, post: Post, max_connections: int) -> None:
        self._post = post
        # Connections are only opened when none is idle, so with at most this many calls holding
        # one at a time, no more than this many are ever open.
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []

    async def call(self) -> int:
        """The response's status; raises OSError or h11's errors when the exchange fails."""
        async with self._slots:
            connection = await self._connection()
            try:
                status = await connection.exchange(self._post)
            except BaseException:  # a time-out too: the reply may still come, so the connection is spent
                connection.close()
                raise
            if connection.open:
                self._idle.append(connection)
            return status

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


async def drive(post: Post, rate_per_s: float, count: int, timeout_s: float, max_connections: int = 2000) -> Run:
    """Start call i at i / rate seconds whatever earlier calls do; each has ``timeout_s`` in all
    (waiting for a connection included)."""
    latencies: list[float | None] = [None] * count
    client = Client(post, max_connections)

    async def call(i: int) -> None:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                status = await client.call()
        except (TimeoutError, OSError, h11.ProtocolError):
            return
        if status == 200:
            latencies[i] = (time.perf_counter() - start) * 1000

    started = time.monotonic()
    try:
        span = await open_loop(rate_per_s, count, call)
    finally:
        client.close()
    return Run(latencies, span, time.monotonic() - started)
