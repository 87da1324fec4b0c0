"""The gateway's HTTP routes (Starlette): ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``POST /v1/feedback`` (feedback.py).

A chat request is authenticated by its virtual key (``Authorization: Bearer fm-...``, looked up
in the replica's ``KeyCache``), decoded (services/gateway/openai_wire.py), made a step
(translate.py), counted by layer 2 when it names a task (antiloop.py) and sent to the router:
answered in one body, or streamed (streaming.py); a client that leaves cancels its call
(disconnect.py). Nothing here keeps state between requests (a task's counts live in KV, shared by
every replica), so replicas are just more processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from schemas.messages import VirtualKey
from services.gateway import translate
from services.gateway.antiloop import GatewayTasks
from services.gateway.errors import GatewayError, invalid, unauthorized
from services.gateway.feedback import accept_feedback
from services.gateway.keys import KeyCache
from services.gateway.mesh_call import call_while_connected
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.openai_wire import AUTO_MODEL, RequestError, decode_request
from services.gateway.streaming import CallStream
from services.runtime.bus import Bus
from services.runtime.catalog import Catalog

BEARER = "bearer "
HEALTH_TIMEOUT_S = 1.0


class Gateway:
    """The request handlers, over one replica's bus, catalogue and keys."""

    def __init__(
        self,
        bus: Bus,
        catalog: Catalog,
        keys: KeyCache,
        default_deadline_s: float,
        tasks: GatewayTasks | None = None,
    ) -> None:
        self.bus = bus
        self.catalog = catalog
        self.keys = keys
        self.default_deadline_s = default_deadline_s
        # Layer 2 for requests that share a task header (services/gateway/antiloop.py); None: off.
        self.tasks = tasks
        self.metrics = GatewayMetrics()

    def authenticate(self, request: Request) -> VirtualKey:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith(BEARER):
            raise unauthorized("No API key provided: send `Authorization: Bearer <key>` (`frugalmesh keys create`)")
        key = self.keys.lookup(header[len(BEARER) :].strip())
        if key is None:
            raise unauthorized("Incorrect API key provided")
        if key.revoked_ms is not None:
            raise unauthorized(f"The API key {key.id} was revoked")
        return key

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        stream = False
        try:
            key = self.authenticate(request)
            try:
                body = decode_request(await request.body())
            except RequestError as exc:
                raise invalid(str(exc), exc.param) from None
            stream = bool(body.stream)
            step, headers = translate.to_step(body, key, request.headers, self.catalog, self.default_deadline_s)
            if self.tasks is not None:
                await self.tasks.admit(step, body.model, request.headers)
            if stream:
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                call = CallStream(self.bus, step, headers, include_usage)
                await call.open(request.receive)
                self.metrics.first_byte.observe(time.perf_counter() - started)
                self.metrics.answered(200, True)
                return StreamingResponse(
                    self._timed(call.events(), started), media_type="text/event-stream", headers=call.response_headers()
                )
            result = await call_while_connected(self.bus, step, headers, request.receive)
            response = Response(
                msgspec.json.encode(translate.completion(result, step.task_id)),
                media_type="application/json",
                headers=translate.headers(result, result.call_id, step.task_id),
            )
        except GatewayError as error:
            response = error.response()
        self.metrics.answered(response.status_code, stream)
        self.metrics.finished(time.perf_counter() - started, stream)
        return response

    async def _timed(self, events: AsyncIterator[bytes], started: float) -> AsyncIterator[bytes]:
        self.metrics.streams_open.inc()
        try:
            async for data in events:
                yield data
        finally:
            self.metrics.streams_open.dec()
            self.metrics.finished(time.perf_counter() - started, True)

    async def models(self, request: Request) -> Response:
        """The routed name and the catalogue's models the key may use, with their tier and prices."""
        try:
            key = self.authenticate(request)
        except GatewayError as error:
            return error.response()
        data: list[dict[str, Any]] = [{"id": AUTO_MODEL, "object": "model", "created": 0, "owned_by": "frugalmesh"}]
        for model in self.catalog.models.values():
            if key.allow_models and model.name not in key.allow_models:
                continue
            prices = {
                "tier": model.tier,
                "input_usd_per_mtok": model.input_usd_per_mtok,
                "output_usd_per_mtok": model.output_usd_per_mtok,
            }
            data.append(
                {"id": model.name, "object": "model", "created": 0, "owned_by": model.provider, "frugalmesh": prices}
            )
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        """200 while this replica reaches NATS (a round trip to the server), else 503."""
        try:
            await asyncio.wait_for(self.bus.flush(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # nats-py raises several unrelated types for "no server"
            return JSONResponse({"status": f"NATS unreachable: {exc!r}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def feedback(self, request: Request) -> Response:
        """``POST /v1/feedback`` (services/gateway/feedback.py)."""
        try:
            return await accept_feedback(self.bus, self.authenticate(request).tenant, request)
        except GatewayError as error:
            return error.response()

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


def create_http_app(gateway: Gateway) -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/v1/feedback", gateway.feedback, methods=["POST"]),
            Route("/health", gateway.health, methods=["GET"]),
            Route("/metrics", gateway.prometheus, methods=["GET"]),
        ]
    )
