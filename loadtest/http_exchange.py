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

from loadtest.httpload import H11Exchange, Post


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-case
    body: bytes
    first_byte: float | None  # perf_counter time of the first body byte; None: an empty body


class _Connection(H11Exchange[Answer]):
    """The replay's connection: keeps the whole answer."""

    def _begin(self) -> None:
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._first_byte: float | None = None

    def _on_response(self, response: h11.Response) -> None:
        self._status = response.status_code
        self._headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}

    def _on_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._first_byte is None and data:
            self._first_byte = time.perf_counter()
        self._body.append(bytes(data))

    def _result(self) -> Answer:
        return Answer(self._status, self._headers, b"".join(self._body), self._first_byte)

    def exchange(self, post: Post) -> asyncio.Future[Answer]:
        return self.send(post.request, post.body)


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
