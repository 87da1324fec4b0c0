"""The router service: each StepRequest becomes one model call on the cheapest allowed tier, or a cache hit.

Queue group ``router`` on ``mesh.step.request``; the reply is always an InferenceResult (an
error one when the step cannot run), or ``Bus.rejection`` for a message that is not a step.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import nats.errors
import structlog
from faststream import FastStream
from faststream.nats import NatsMessage

from schemas.messages import (
    ErrorInfo,
    ErrorKind,
    InferenceRequest,
    InferenceResult,
    Outcome,
    StepRequest,
    Usage,
    UsageEvent,
)
from schemas.subjects import (
    BUCKET_RESPONSE_CACHE,
    HEADER_DEADLINE,
    HEADER_TASK,
    HEADER_TENANT,
    HEADER_TRACEPARENT,
    token,
)
from services.router.cache import ResponseCache, cache_key
from services.router.table import PinningError, RoutingTable
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.settings import MeshSettings
from services.runtime.tokens import count_message_tokens

SERVICE = "router"
QUEUE = "router"
# A cached answer is as good as the call that made it, but models and prompts drift: a day
# bounds how stale a served answer can be while still catching a day's repeats.
DEFAULT_CACHE_TTL_S = 24 * 3600.0


class Router:
    """The per-step logic, apart from FastStream so that it reads top to bottom."""

    def __init__(self, bus: Bus, table: RoutingTable, catalog: Catalog, cache_ttl_s: float) -> None:
        self.bus = bus
        self.table = table
        self.catalog = catalog
        self.cache_ttl_s = cache_ttl_s
        self.log = bus.log
        self.cache: ResponseCache | None = None

    async def open_cache(self) -> None:
        kv = await self.bus.broker.key_value(self.bus.subjects.bucket(BUCKET_RESPONSE_CACHE), ttl=self.cache_ttl_s)
        self.cache = ResponseCache(kv, self.log)

    async def route(self, step: StepRequest, traceparent: str | None = None) -> InferenceResult:
        started = time.perf_counter()
        call_id = uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(task_id=step.task_id, call_id=call_id):
            try:
                model = self.table.choose(step, self.catalog)
            except PinningError as exc:
                # Nothing is sent, so nothing is spent or metered: the planner sees why.
                self.log.warning("pinning_refused", step_id=step.step_id, error=str(exc))
                return InferenceResult(
                    call_id=call_id, model="", tier=exc.tier, error=ErrorInfo(kind="pinning", message=str(exc))
                )
            assert self.cache is not None, "open_cache runs at startup, before any subscriber"
            key = cache_key(model.name, step)
            cached = await self.cache.get(key)
            if cached is not None:
                return await self._serve_cached(step, model, cached, call_id, started)
            result = await self._call(step, model, call_id, started, traceparent)
            if result.error is None:
                await self.cache.put(key, result)
            return result

    async def _serve_cached(
        self, step: StepRequest, model: ModelSpec, cached: InferenceResult, call_id: str, started: float
    ) -> InferenceResult:
        latency_ms = (time.perf_counter() - started) * 1000
        result = msgspec.structs.replace(cached, call_id=call_id, cache_hit=True, cost_usd=0.0, latency_ms=latency_ms)
        # The tokens are the original call's, so analysts can see what the hit saved.
        await self.bus.publish_usage(
            UsageEvent(
                event_id=call_id,
                time_ms=now_ms(),
                tenant=step.tenant,
                task_id=step.task_id,
                step_id=step.step_id,
                call_id=call_id,
                service=SERVICE,
                tier=cached.tier,
                provider=cached.provider,
                model=cached.model,
                requested_model=model.name,
                input_tokens=cached.usage.input_tokens,
                cached_input_tokens=cached.usage.cached_input_tokens,
                output_tokens=cached.usage.output_tokens,
                cost_usd=0.0,
                latency_ms=latency_ms,
                outcome="cache_hit",
            )
        )
        self.log.debug("cache_hit", model=model.name)
        return result

    async def _call(
        self, step: StepRequest, model: ModelSpec, call_id: str, started: float, traceparent: str | None
    ) -> InferenceResult:
        timeout_s = (step.deadline_ms - now_ms()) / 1000
        if timeout_s <= 0:
            # Nothing was sent, so nothing can have been spent: no usage row, just the refusal.
            return InferenceResult(
                call_id=call_id,
                model=model.name,
                tier=model.tier,
                provider=model.provider,
                error=ErrorInfo(kind="timeout", message="the step's deadline passed before the call was sent"),
            )
        request = InferenceRequest(
            call_id=call_id,
            task_id=step.task_id,
            step_id=step.step_id,
            tenant=step.tenant,
            attempt=step.attempt,
            model=model.name,
            tier=model.tier,
            messages=step.messages,
            max_tokens=step.max_tokens,
            response_schema=step.response_schema,
            deadline_ms=step.deadline_ms,
        )
        headers = {HEADER_DEADLINE: str(step.deadline_ms), HEADER_TASK: step.task_id, HEADER_TENANT: step.tenant}
        if traceparent:
            headers[HEADER_TRACEPARENT] = traceparent
        try:
            return await self.bus.request(
                model.subject(self.bus.subjects), request, InferenceResult, timeout_s, headers
            )
        except nats.errors.NoRespondersError:
            return await self._failed(
                step, model, call_id, started, "unavailable", "error", "no inference service answers"
            )
        except TimeoutError:
            return await self._failed(
                step,
                model,
                call_id,
                started,
                "timeout",
                "timeout",
                f"no result within the deadline ({timeout_s:.3f} s)",
            )
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return await self._failed(
                step, model, call_id, started, "provider", "error", f"unreadable InferenceResult: {exc}"
            )

    async def _failed(
        self,
        step: StepRequest,
        model: ModelSpec,
        call_id: str,
        started: float,
        kind: ErrorKind,
        outcome: Outcome,
        message: str,
    ) -> InferenceResult:
        """Reply an error and meter the call at its worst case: whether it ran, and what it cost,
        is unknown here, and unknown usage is never recorded as zero. If the inference service
        meters the same call, both rows share event_id = call_id and JetStream keeps one."""
        latency_ms = (time.perf_counter() - started) * 1000
        usage = Usage(input_tokens=count_message_tokens(model.tokenizer, step.messages), output_tokens=step.max_tokens)
        cost = model.worst_case_cost(usage.input_tokens, usage.output_tokens)
        self.log.warning("call_failed", model=model.name, kind=kind, error=message)
        await self.bus.publish_usage(
            UsageEvent(
                event_id=call_id,
                time_ms=now_ms(),
                tenant=step.tenant,
                task_id=step.task_id,
                step_id=step.step_id,
                call_id=call_id,
                service=SERVICE,
                tier=model.tier,
                provider=model.provider,
                model=model.name,
                requested_model=model.name,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=cost,
                latency_ms=latency_ms,
                outcome=outcome,
                usage_source="estimated",
            )
        )
        # The reply carries the metered cost too, so the planner's running total matches the books.
        return InferenceResult(
            call_id=call_id,
            model=model.name,
            tier=model.tier,
            provider=model.provider,
            usage=usage,
            latency_ms=latency_ms,
            cost_usd=cost,
            # Another replica may be up by the time the planner retries; a timed-out step has no time left.
            error=ErrorInfo(kind=kind, message=message, retryable=kind == "unavailable"),
        )


def create_app(
    settings: MeshSettings,
    *,
    table: RoutingTable | None = None,
    catalog: Catalog | None = None,
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
) -> FastStream:
    """The router; ``table`` and ``catalog`` default to deploy/routing.toml and deploy/models.toml."""
    bus = Bus(settings, SERVICE)
    router = Router(
        bus,
        table or RoutingTable.load(settings.deploy_dir),
        catalog or Catalog.load(settings.deploy_dir),
        cache_ttl_s,
    )
    app = bus.app()
    # Registered after bus.app()'s own hook, which connects the broker; subscribers start after both.
    app.on_startup(router.open_cache)

    @bus.broker.subscriber(settings.subjects.step_request, queue=QUEUE)
    async def on_step(msg: NatsMessage) -> bytes:
        step = await bus.decode(msg, StepRequest)
        if step is None:
            return bus.rejection(f"not a valid StepRequest; kept on {settings.subjects.dlq(SERVICE)}")
        try:
            # The tenant names the usage subject; a bad one must fail here, not after a paid call.
            token(step.tenant)
        except ValueError as exc:
            await bus.dead_letter(msg.raw_message.subject, msg.body, msg.headers, str(exc))
            return bus.rejection(str(exc))
        return encode(await router.route(step, msg.headers.get(HEADER_TRACEPARENT)))

    return app
