"""Replays a gateway recording (loadtest/gateway_traffic.py) against a gateway over HTTP, open loop.

Each recorded request is sent at its recorded arrival time divided by the speed, whatever earlier
requests are doing (a slow gateway shows up as latency and loss, not as a politely slower client),
with its recorded body and ``x-frugalmesh-*`` headers, streamed or not as recorded, under the
replay's own key. Connections are HTTP/1.1 keep-alive (loadtest/http_exchange.py).

Each answer is read whole: its status; for a 200, the usage and cost the body carries (a stream's
finishing chunk); the call id from ``x-frugalmesh-call-id`` (error answers of metered calls have it
too); a stream counts as answered only once it ends with ``[DONE]`` or an error event. The
zero-loss check (loadtest/gateway_report.py): every request answered, and with a ClickHouse URL,
one usage row per call id the answers named.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import clickhouse_connect
import h11
import msgspec

from loadtest.gateway_report import GatewayReport, Served, build_report
from loadtest.gateway_traffic import GatewayTraffic, RecordedRequest, replay_headers, salted, sized
from loadtest.http_exchange import Answer, Pool
from loadtest.httpload import Post

CHAT_PATH = "/v1/chat/completions"
# How long the accountant may take to store the last rows after the last answer.
INGEST_WAIT_S = 30.0
ROWS_PER_CALL = "SELECT call_id, count() FROM usage_events FINAL WHERE call_id IN {ids:Array(String)} GROUP BY call_id"


@dataclass
class GatewayReplayOptions:
    speed: float = 1.0
    timeout_s: float = 300.0  # per request, from its send to its last byte
    salt: str = ""  # see gateway_traffic.salted
    # Ask for the recorded output length (gateway_traffic.sized): for the synthetic backend, which
    # writes max_tokens of text, the one way to replay the recorded output sizes.
    recorded_output: bool = False
    max_connections: int = 2000


@dataclass
class GatewayLive:
    """What the progress bar shows."""

    total: int
    sent: int = 0
    ok: int = 0
    errors: int = 0  # answered, with an error
    lost: int = 0  # no complete answer
    spend_usd: float = 0.0

    @property
    def finished(self) -> int:
        return self.ok + self.errors + self.lost

    def line(self) -> str:
        in_flight = self.sent - self.finished
        return (
            f"sent {self.sent}  ok {self.ok}  errors {self.errors}  lost {self.lost}  "
            f"in flight {in_flight}  ${self.spend_usd:.4f}"
        )


def chat_url(gateway: str) -> str:
    """``http://host:port``, with or without ``/v1``, as the chat completions URL."""
    base = gateway.rstrip("/")
    base = base.removesuffix(CHAT_PATH).removesuffix("/v1")
    return base + CHAT_PATH


class GatewayReplayer:
    def __init__(
        self,
        gateway: str,
        key: str,
        traffic: GatewayTraffic,
        options: GatewayReplayOptions,
        clickhouse_url: str | None = None,
    ) -> None:
        if options.speed <= 0:
            raise ValueError(f"speed must be positive, not {options.speed}")
        self.url = chat_url(gateway)
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the gateway must be a plain http:// URL, not {gateway!r}")
        self.pool = Pool(parts.hostname, parts.port or 80, options.max_connections)
        self.key = key
        self.traffic = traffic
        self.options = options
        self.clickhouse_url = clickhouse_url
        self.run_id = uuid.uuid4().hex[:8]
        self.live = GatewayLive(total=len(traffic.requests))
        self.served: list[Served] = []
        self.last_end = 0.0

    async def run(self, on_tick: Callable[[GatewayLive], None] | None = None) -> GatewayReport:
        ticker = asyncio.create_task(self._tick(on_tick)) if on_tick else None
        requests = self.traffic.requests
        self.served = [Served(stream=r.stream) for r in requests]
        started = time.monotonic()
        running: set[asyncio.Task[None]] = set()
        try:
            for i, request in enumerate(requests):
                delay = started + request.arrival_s / self.options.speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._send(i, self._post(request)))
                running.add(task)
                task.add_done_callback(running.discard)
                self.live.sent += 1
            span_s = time.monotonic() - started
            await asyncio.gather(*running)
        finally:
            self.pool.close()
            if ticker and on_tick:
                ticker.cancel()
                on_tick(self.live)
        rows = await self._usage_rows() if self.clickhouse_url else None
        wall_s = max(self.last_end - started, 1e-9)
        return build_report(self.traffic, self.served, rows, span_s=span_s, wall_s=wall_s)

    def _post(self, request: RecordedRequest) -> Post:
        body = salted(request.body, self.options.salt)
        if self.options.recorded_output:
            body = sized(body, request.output_tokens)
        data = msgspec.json.encode(body)
        headers = {"Authorization": f"Bearer {self.key}", **replay_headers(request, self.run_id)}
        return Post.json(self.url, data, headers)

    async def _send(self, i: int, post: Post) -> None:
        served = self.served[i]
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.options.timeout_s):
                answer = await self.pool.send(post)
        except TimeoutError:
            served.problem = f"no answer within {self.options.timeout_s:g} s"
        except (OSError, h11.ProtocolError) as exc:
            served.problem = f"{type(exc).__name__}: {exc}"
        else:
            read_answer(served, answer, start)
        self.last_end = max(self.last_end, time.monotonic())
        live = self.live
        live.spend_usd += served.cost_usd
        if not served.answered:
            live.lost += 1
        elif served.ok:
            live.ok += 1
        else:
            live.errors += 1

    async def _tick(self, on_tick: Callable[[GatewayLive], None] | None) -> None:
        while on_tick is not None:
            on_tick(self.live)
            await asyncio.sleep(0.1)

    async def _usage_rows(self) -> dict[str, int]:
        """Usage rows per call id the answers named; waits for the accountant to store those that
        must have one (``Served.metered``)."""
        assert self.clickhouse_url is not None
        ids = sorted({s.call_id for s in self.served if s.call_id})
        expected = {s.call_id for s in self.served if s.call_id and s.metered}
        client = await asyncio.to_thread(clickhouse_connect.get_client, dsn=self.clickhouse_url)
        deadline = time.monotonic() + INGEST_WAIT_S
        try:
            while True:
                result = await asyncio.to_thread(client.query, ROWS_PER_CALL, parameters={"ids": ids})
                rows = {row[0]: row[1] for row in result.result_rows}
                if expected <= rows.keys() or time.monotonic() > deadline:
                    return rows
                await asyncio.sleep(0.25)
        finally:
            client.close()


def read_answer(served: Served, answer: Answer, start: float) -> None:
    """Fill ``served`` from a complete HTTP answer."""
    served.status = answer.status
    served.call_id = answer.headers.get("x-frugalmesh-call-id") or None
    served.latency_ms = (time.perf_counter() - start) * 1000
    if served.stream and answer.first_byte is not None:
        served.ttft_ms = (answer.first_byte - start) * 1000
    documents = _documents(answer.body, served.stream and answer.status == 200)
    ended = not served.stream or answer.status != 200 or answer.body.rstrip().endswith(b"data: [DONE]")
    for document in documents:
        error = document.get("error")
        if isinstance(error, dict):
            served.problem = f"{answer.status}: {error.get('message', '')}"
            ended = True  # an error event ends a stream
        usage = document.get("usage")
        if isinstance(usage, dict):
            served.input_tokens = usage.get("prompt_tokens") or 0
            served.output_tokens = usage.get("completion_tokens") or 0
            served.cached_input_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        mesh = document.get("frugalmesh")
        if isinstance(mesh, dict):
            served.cost_usd = mesh.get("cost_usd") or 0.0
            served.cache_hit = bool(mesh.get("cache_hit"))
            served.call_id = mesh.get("call_id") or served.call_id
    if answer.status != 200 and not served.problem:
        served.problem = f"{answer.status}: {answer.body[:200].decode('utf-8', 'replace')}"
    if not ended:
        served.problem = "the stream ended without [DONE] or an error event"
    served.answered = ended


def _documents(body: bytes, stream: bool) -> Sequence[dict]:
    """The JSON body; of a stream, its events from the last one back to the first that carries usage."""
    if not stream:
        try:
            document = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return []
        return [document] if isinstance(document, dict) else []
    found: list[dict] = []
    for event in reversed(body.split(b"\n\n")):
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            continue
        try:
            document = msgspec.json.decode(event[len(b"data: ") :])
        except msgspec.DecodeError:
            continue
        if isinstance(document, dict):
            found.append(document)
            if "error" in document or document.get("usage"):
                break
    return found


async def replay_gateway(
    gateway: str,
    key: str,
    traffic: GatewayTraffic,
    options: GatewayReplayOptions,
    clickhouse_url: str | None = None,
    on_tick: Callable[[GatewayLive], None] | None = None,
) -> GatewayReport:
    return await GatewayReplayer(gateway, key, traffic, options, clickhouse_url).run(on_tick)
