"""The engine's HTTP face: the parts of the OpenAI API the mesh uses, and Prometheus metrics.

- ``POST /v1/chat/completions``: streamed (server-sent events, with a final usage chunk when
  ``stream_options.include_usage``) or one JSON body; ``response_format`` json_schema and
  json_object are enforced by grammar; ``stop``, ``top_p`` and ``seed`` are honoured; a request
  offering ``tools`` gets a 400 (request.py says what is accepted). A streaming client that
  disconnects stops its generation at the next token (or before it starts, if it was still
  waiting for its turn). Errors have OpenAI's shape: ``{"error": {message, type, param, code}}``.
- ``GET /v1/models``, ``GET /health``.
- ``GET /metrics``: llama.cpp server's metric names (``llamacpp:requests_processing``,
  ``llamacpp:requests_deferred``, ``llamacpp:kv_cache_usage_ratio``, ...), so one reader serves
  this engine and llama.cpp's own server alike.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.embedded.engine.model import DEFAULT_TOP_P, Generation, GenerationStats, LocalModel, PromptTooLong
from services.embedded.engine.request import ChatRequest, template_messages
from services.inference.engine_load import LLAMACPP_DECODE_RATE, LLAMACPP_KV, LLAMACPP_RUNNING, LLAMACPP_WAITING

# Requests waiting for their turn each hold a thread; this bounds the queue an engine accepts.
MAX_QUEUED = 64


class _LoadCollector:
    """Reads the model's live load at scrape time."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model

    def collect(self):  # noqa: ANN201 (prometheus_client's collector protocol)
        load = self.model.load
        yield GaugeMetricFamily(LLAMACPP_RUNNING, "Requests generating now.", value=load.processing)
        yield GaugeMetricFamily(LLAMACPP_WAITING, "Requests waiting for their turn.", value=load.deferred)
        yield GaugeMetricFamily(LLAMACPP_KV, "Share of the context window in use.", value=self.model.kv_cache_usage())
        yield CounterMetricFamily(
            "llamacpp:prompt_tokens", "Prompt tokens processed.", value=load.prompt_tokens_total
        )
        yield CounterMetricFamily(
            "llamacpp:tokens_predicted", "Output tokens generated.", value=load.tokens_predicted_total
        )
        yield GaugeMetricFamily(
            LLAMACPP_DECODE_RATE,
            "Decoding speed of the last generation, output tokens per second.",
            value=load.predicted_tokens_seconds,
        )


def create_app(model: LocalModel) -> Starlette:
    registry = CollectorRegistry()
    registry.register(_LoadCollector(model))
    executor = ThreadPoolExecutor(max_workers=MAX_QUEUED, thread_name_prefix="generate")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        return JSONResponse(body, status_code=status)

    async def chat_completions(request: Request) -> Response:
        try:
            body = msgspec.json.decode(await request.body(), type=ChatRequest)
        except msgspec.DecodeError as exc:
            return error(400, f"not a valid chat completion request: {exc}")
        if body.model and body.model != model.name:
            return error(404, f"this engine serves {model.name!r}, not {body.model!r}", "not_found_error")
        refused = body.tools_error()
        if refused is not None:
            return error(400, refused, param="tools")
        try:
            schema = body.json_schema()
        except ValueError as exc:
            return error(400, str(exc), param="response_format")
        try:
            prompt = model.prompt_tokens(template_messages(body.messages))
        except PromptTooLong as exc:
            return error(400, str(exc), param="messages")
        generation = Generation(
            prompt=prompt,
            max_tokens=body.max_tokens or model.n_ctx,
            temperature=body.temperature or 0.0,
            top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_sequences(),
            json_schema=schema,
        )
        if model.load.processing + model.load.deferred >= MAX_QUEUED:
            return error(503, f"{MAX_QUEUED} requests already queued; retry later", "server_busy")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        outcome = GenerationStats()
        pieces = _pieces(model, generation, outcome, executor)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _sse(model.name, completion_id, created, pieces, outcome, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        text = "".join([piece async for piece in pieces])
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": outcome.finish_reason,
                    }
                ],
                "usage": _usage(outcome),
            }
        )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    async def models(_: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "frugalmesh"}]}
        )

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )


_DONE = object()


async def _pieces(
    model: LocalModel, generation: Generation, outcome: GenerationStats, executor: ThreadPoolExecutor
) -> AsyncIterator[str]:
    """The model's pieces, generated on a worker thread. Leaving early (the client went away, so
    Starlette cancels the response) tells the thread to stop at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def produce() -> None:
        try:
            for piece in model.generate(generation, outcome, cancelled):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except Exception as exc:  # handed to the request's task, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    loop.run_in_executor(executor, produce)
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancelled.set()


async def _sse(
    name: str,
    completion_id: str,
    created: int,
    pieces: AsyncIterator[str],
    outcome: GenerationStats,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name}
        return b"data: " + msgspec.json.encode(chunk | {"choices": choices} | extra) + b"\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
    async for piece in pieces:
        yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": outcome.finish_reason}])
    if include_usage:
        yield event([], usage=_usage(outcome))
    yield b"data: [DONE]\n\n"


def _usage(outcome: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }
