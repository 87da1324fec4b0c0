"""What recording the gateway's traffic costs (services/gateway/recording.py):
``python -m loadtest.bench.recording --json``.

Two figures, per chat request, over a stand-in ASGI app that answers like the gateway (a 500-byte
request, six ``x-frugalmesh-*`` response headers, a 700-byte JSON body; or a stream of 40 events):

- on the event loop (the hot path): the wrapped app's time minus the bare app's, called in turn;
- in the writer's thread (off the loop): the time to make and encode one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from services.gateway.recording import MAX_PENDING, GatewayRecorder, record_line

REQUEST = json.dumps(
    {"model": "gpt-4-1106-preview", "messages": [{"role": "user", "content": "word " * 80}], "max_tokens": 64}
).encode()
HEADERS = [
    (b"x-frugalmesh-call-id", b"c" * 32),
    (b"x-frugalmesh-task", b"t" * 32),
    (b"x-frugalmesh-model", b"gpt-4-1106-preview"),
    (b"x-frugalmesh-tier", b"frontier"),
    (b"x-frugalmesh-cost-usd", b"0.0010000000"),
    (b"x-frugalmesh-cache", b"miss"),
]
COST = {"cost_usd": 0.001, "call_id": "c" * 32, "model": "gpt-4-1106-preview", "tier": "frontier", "cache_hit": False}
ANSWER = json.dumps(
    {
        "choices": [{"message": {"role": "assistant", "content": "word " * 100}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 90, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 0}},
        "frugalmesh": COST,
    }
).encode()
USAGE = {"prompt_tokens": 90, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 0}}
EVENT = b'data: {"choices":[{"delta":{"content":"word "}}]}\n\n'
FINISH = b"data: " + json.dumps({"choices": [{"finish_reason": "stop"}], "usage": USAGE, "frugalmesh": COST}).encode()


def stand_in(stream: bool) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        kind = b"text/event-stream" if stream else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind), *HEADERS]})
        if stream:
            for _ in range(40):
                await send({"type": "http.response.body", "body": EVENT, "more_body": True})
            await send({"type": "http.response.body", "body": FINISH + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"" if stream else ANSWER, "more_body": False})

    return app


async def measure(calls: int, stream: bool) -> dict[str, float]:
    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    scope = {
        "type": "http",
        "path": "/v1/chat/completions",
        "method": "POST",
        "headers": [(b"authorization", b"Bearer x")],
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": REQUEST, "more_body": False}

    async def send(message: Any) -> None:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        recorder = await GatewayRecorder.open(Path(tmp) / "r.jsonl", lambda secret: None, Quiet())
        bare = stand_in(stream)
        wrapped = recorder.wrap(bare)
        spent = {"bare": 0.0, "wrapped": 0.0}
        for _ in range(calls):
            for name, app in (("bare", bare), ("wrapped", wrapped)):
                started = time.perf_counter()
                await app(scope, receive, send)
                spent[name] += time.perf_counter() - started
        # Never yielded to: every record is still queued (calls <= MAX_PENDING), made here as the writer would.
        pending = [item for item in list(recorder.queue._queue) if item is not None]  # type: ignore[attr-defined]
        started = time.perf_counter()
        for exchange in pending:
            msgspec.json.encode(record_line(exchange, 0.0))
        writer_s = time.perf_counter() - started
        await recorder.close()
    return {
        "loop_us_per_request": (spent["wrapped"] - spent["bare"]) / calls * 1e6,
        "bare_app_us_per_request": spent["bare"] / calls * 1e6,
        "writer_us_per_line": writer_s / max(1, len(pending)) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=MAX_PENDING, help=f"Per kind, at most {MAX_PENDING}.")
    parser.add_argument("--json", action="store_true", help="One JSON object on stdout.")
    args = parser.parse_args()
    figures = {kind: asyncio.run(measure(args.calls, kind == "stream")) for kind in ("json", "stream")}
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
