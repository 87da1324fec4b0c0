"""Recording what the gateway serves (``FRUGALMESH_GATEWAY_RECORD=<path>``): one JSON line per chat
request, which `frugalmesh loadtest replay` sends again and anyone can read with jq.

Why: a load test is only as telling as its traffic. The public traces hold sizes; the gateway sees
what agents really send (messages, tools, response formats, streamed or not, and when).

How, without slowing what it records: an ASGI wrapper around the routes keeps references and clock
readings only (the request body's bytes, the response status and ``x-frugalmesh-*`` headers, the
body or a stream's last events; arrival, first byte, end) and puts them on a bounded queue. A
background task takes them in batches and, in a worker thread, decodes, summarises and encodes them
and appends the lines with one ``write`` per batch (``O_APPEND``: replicas may share one file
without tearing lines). Nothing on the event loop parses JSON or touches the disk. A full queue
(``MAX_PENDING`` behind) drops the record rather than hold a request: counted, logged. ``close``
(at shutdown, after the HTTP server stopped) writes what is still queued.

Never recorded: the ``Authorization`` header, or any request header but the ``x-frugalmesh-*``
ones. The key appears as its public id and tenant (what `keys list` shows and usage rows carry):
a recording splits by key yet holds no credential; a replay sends every line under its own key.
Prompts are recorded whole, so the file (created 0600) is as sensitive as they are. The line
format is in docs/benchmarks.md ("Load tests with recorded traffic").
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.messages import VirtualKey

RECORDING_VERSION = 1
SOURCE = "gateway"  # tells a gateway recording from the loadtest's own (loadtest/traces.py)
CHAT_PATH = "/v1/chat/completions"
MAX_PENDING = 10_000
MAX_BATCH = 1_000
# A stream's finishing chunk, OpenAI's usage chunk and [DONE]: what the record needs of a stream.
STREAM_TAIL = 3
OWN_HEADER = "x-frugalmesh-"
BEARER = "bearer "
# A line's field <- the field of the response's ``frugalmesh`` object (services/gateway/openai_wire.py: Cost).
COST_FIELDS = {f: f for f in ("cost_usd", "call_id", "task_id", "tier", "cache_hit")} | {"served_model": "model"}


@dataclass(slots=True)
class Exchange:
    """What the wrapper keeps of one chat request: references and clock readings, nothing parsed."""

    arrived_ms: float  # wall clock, ms since the epoch
    started: float  # perf_counter
    tenant: str | None
    key_id: str | None
    request_headers: dict[str, str]
    body: list[bytes] = field(default_factory=list)
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    response: collections.deque[bytes] | list[bytes] = field(default_factory=list)
    first_byte: float | None = None
    ended: float | None = None
    complete: bool = False  # the last body message was sent: the client got the whole answer

    def response_started(self, message: Message) -> None:
        self.status = message["status"]
        for name, value in message.get("headers", ()):
            key = name.decode("latin-1").lower()
            if key.startswith(OWN_HEADER):
                self.response_headers[key] = value.decode("latin-1")
            elif key == "content-type" and value.startswith(b"text/event-stream"):
                self.stream = True
                self.response = collections.deque(maxlen=STREAM_TAIL)

    def response_body(self, message: Message) -> None:
        data = message.get("body", b"")
        if data:
            if self.first_byte is None:
                self.first_byte = time.perf_counter()
            self.response.append(data)
        if not message.get("more_body", False):
            self.complete = True


class GatewayRecorder:
    """``open``, ``wrap`` the HTTP app, ``close`` at shutdown."""

    def __init__(self, fd: int, identify: Callable[[str], VirtualKey | None], log: Any) -> None:
        self.fd = fd
        self.identify = identify
        self.log = log
        self.opened_ms = time.time() * 1000
        self.queue: asyncio.Queue[Exchange | None] = asyncio.Queue(MAX_PENDING)
        self.written = 0
        self.dropped = 0  # queue full or closed: never recorded
        self.lost = 0  # the write failed
        self.closing = False
        self.writer = asyncio.create_task(self._write_batches())

    @classmethod
    async def open(cls, path: str | Path, identify: Callable[[str], VirtualKey | None], log: Any) -> GatewayRecorder:
        """Append to ``path`` (created 0600 with its folder); ``identify`` maps a secret to its key."""
        return cls(await asyncio.to_thread(_open, Path(path)), identify, log)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` with every ``POST /v1/chat/completions`` recorded; other routes pass straight through."""

        async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] != CHAT_PATH or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            exchange = self._exchange(scope)

            async def receive_body() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    exchange.body.append(message.get("body", b""))
                return message

            async def send_response(message: Message) -> None:
                await send(message)  # first: what the client did not get (it left) is not recorded as sent
                if message["type"] == "http.response.start":
                    exchange.response_started(message)
                elif message["type"] == "http.response.body":
                    exchange.response_body(message)

            try:
                await app(scope, receive_body, send_response)
            finally:
                exchange.ended = time.perf_counter()
                self._put(exchange)

        return recorded

    def _exchange(self, scope: Scope) -> Exchange:
        key: VirtualKey | None = None
        own: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"authorization":
                text = value.decode("latin-1")
                if text.lower().startswith(BEARER):
                    key = self.identify(text[len(BEARER) :].strip())
            elif name.startswith(b"x-frugalmesh-"):
                own[name.decode("latin-1")] = value.decode("latin-1")
        return Exchange(
            arrived_ms=time.time() * 1000,
            started=time.perf_counter(),
            tenant=key.tenant if key else None,
            key_id=key.id if key else None,
            request_headers=own,
        )

    def _put(self, exchange: Exchange) -> None:
        if self.closing or self.queue.full():
            self.dropped += 1
            if self.dropped == 1:
                self.log.warning("gateway_record_dropped", reason="closed" if self.closing else "queue full")
            return
        self.queue.put_nowait(exchange)

    async def _write_batches(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            exchanges = [x for x in batch if x is not None]
            if exchanges:
                try:
                    await asyncio.to_thread(self._append, exchanges)
                except Exception as exc:  # the writer must outlive a bad batch, or nothing more is recorded
                    self.lost += len(exchanges)
                    self.log.error("gateway_record_failed", error=repr(exc), lost=self.lost)
            if len(exchanges) < len(batch):  # close() queued None: everything before it is written
                return

    def _append(self, exchanges: list[Exchange]) -> None:
        data = b"".join(msgspec.json.encode(record_line(x, self.opened_ms)) + b"\n" for x in exchanges)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(exchanges)

    async def close(self) -> None:
        """Write what is queued, then close the file; later requests are not recorded."""
        self.closing = True
        await self.queue.put(None)
        await self.writer
        os.close(self.fd)
        self.log.info("gateway_record_closed", written=self.written, dropped=self.dropped, lost=self.lost)


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def record_line(x: Exchange, opened_ms: float) -> dict[str, Any]:
    """The line of ``x`` (made in the writer's thread: all the parsing happens here)."""
    raw = b"".join(x.body)
    request = _json(raw)
    line: dict[str, Any] = {
        "v": RECORDING_VERSION,
        "source": SOURCE,
        "ts_ms": round(x.arrived_ms, 3),
        "t_ms": round(x.arrived_ms - opened_ms, 3),
        "tenant": x.tenant,
        "key_id": x.key_id,
        "headers": x.request_headers,
        **request_fields(request if isinstance(request, dict) else {}),
        "request": request if isinstance(request, dict) else None,
    }
    if not isinstance(request, dict):
        line["request_text"] = raw.decode("utf-8", "replace")
    line |= response_fields(x)
    end = x.ended if x.ended is not None else x.started
    line["latency_ms"] = round((end - x.started) * 1000, 3)
    line["ttft_ms"] = round((x.first_byte - x.started) * 1000, 3) if x.stream and x.first_byte else None
    return line


def request_fields(request: dict[str, Any]) -> dict[str, Any]:
    """The request's shape at a glance (the body itself follows in ``request``)."""
    tools = request.get("tools")
    names = [_get(t, "function", "name") for t in tools] if isinstance(tools, list) else []
    messages = request.get("messages")
    return {
        "model": request.get("model"),
        "stream": bool(request.get("stream")),
        "messages": len(messages) if isinstance(messages, list) else 0,
        "tools": names,
        "response_format": _get(request, "response_format", "type"),
        "max_tokens": request.get("max_completion_tokens") or request.get("max_tokens"),
    }


def response_fields(x: Exchange) -> dict[str, Any]:
    """Status, outcome and the call's ids, usage and cost: from the body (a stream's last events),
    else from the ``x-frugalmesh-*`` headers (an error response of a metered call has them)."""
    h = x.response_headers
    cost = h.get("x-frugalmesh-cost-usd")
    out: dict[str, Any] = {
        "status": x.status,
        "outcome": "ok",
        "error": None,
        "call_id": h.get("x-frugalmesh-call-id"),
        "task_id": h.get("x-frugalmesh-task"),
        "served_model": h.get("x-frugalmesh-model"),
        "tier": h.get("x-frugalmesh-tier"),
        "cache_hit": h["x-frugalmesh-cache"] == "hit" if "x-frugalmesh-cache" in h else None,
        "finish_reason": None,
        "usage": None,
        "cost_usd": float(cost) if cost and cost.replace(".", "", 1).isdigit() else None,
    }
    for document in _documents(x):
        if isinstance(document.get("error"), dict):
            out["error"] = document["error"]
        usage = document.get("usage")
        if isinstance(usage, dict):
            out["usage"] = {
                "input_tokens": usage.get("prompt_tokens"),
                "output_tokens": usage.get("completion_tokens"),
                "cached_input_tokens": _get(usage, "prompt_tokens_details", "cached_tokens") or 0,
            }
        mesh = document.get("frugalmesh")
        if isinstance(mesh, dict):
            out |= {name: mesh.get(field) for name, field in COST_FIELDS.items()}
        for choice in document.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                out["finish_reason"] = choice["finish_reason"]
    if not x.complete:
        out["outcome"] = "disconnected"  # the client went away (or the replica stopped) mid-answer
    elif x.status != 200 or out["error"] is not None:
        out["outcome"] = "error"
    return out


def _documents(x: Exchange) -> list[dict[str, Any]]:
    """The JSON body, or the JSON events of a stream's tail."""
    body = b"".join(x.response)
    pieces = [e[len(b"data: ") :] for e in body.split(b"\n\n") if e.startswith(b"data: ")] if x.stream else [body]
    return [document for document in map(_json, pieces) if isinstance(document, dict)]


def _json(data: bytes) -> Any:
    """``data`` decoded; None when it is not JSON (``[DONE]``, a body cut short)."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None


def _get(document: Any, outer: str, inner: str) -> Any:
    value = document.get(outer) if isinstance(document, dict) else None
    return value.get(inner) if isinstance(value, dict) else None
