"""HTTP/1.1 exchanges that keep the whole answer: status, headers, body and the time of its first
body byte, for a replay that sends a different request each call and reads what came back.

loadtest/httpload.py keeps only the status and times (a benchmark sends one request over and over
and needs nothing more, at the least CPU); a replay must know each answer's call id, usage, cost and
whether a stream ended properly. Same design: a plain ``asyncio.Protocol`` per keep-alive
connection, h11 parsing the responses, one exchange in flight per connection, connections opened on
demand up to a cap and reused; requests are ``httpload.Post``s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import h11

from loadtest.httpload import Post


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-case
    body: bytes
    first_byte: float | None  # perf_counter time of the first body byte; None: an empty body


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._http = h11.Connection(our_role=h11.CLIENT)
        self._reply: asyncio.Future[Answer] | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._first_byte: float | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def exchange(self, post: Post) -> asyncio.Future[Answer]:
        assert self._transport is not None
        self._reply = asyncio.get_running_loop().create_future()
        self._status, self._headers, self._body, self._first_byte = 0, {}, [], None
        self._transport.write(
            self._http.send(post.request) + self._http.send(post.body) + self._http.send(h11.EndOfMessage())
        )
        return self._reply

    def data_received(self, data: bytes) -> None:
        self._http.receive_data(data)
        self._read_events()

    def eof_received(self) -> bool:
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
                self._headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
            elif isinstance(event, h11.Data):
                if self._first_byte is None and event.data:
                    self._first_byte = time.perf_counter()
                self._body.append(bytes(event.data))
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
        else:  # the server asked to close
            self.close()
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(Answer(self._status, self._headers, b"".join(self._body), self._first_byte))

    def _fail(self, exc: BaseException) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(exc)


class Pool:
    """Sends ``Post``s to one server over at most ``max_connections`` keep-alive connections."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self._host = host
        self._port = port
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []

    async def send(self, post: Post) -> Answer:
        """The whole answer; raises OSError or h11's errors when the exchange fails."""
        async with self._slots:
            connection = await self._connection()
            try:
                answer = await connection.exchange(post)
            except BaseException:  # a time-out too: the answer may still come, so the connection is spent
                connection.close()
                raise
            if connection.open:
                self._idle.append(connection)
            return answer

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.open:
                return connection
        _, connection = await asyncio.get_running_loop().create_connection(_Connection, self._host, self._port)
        return connection

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
