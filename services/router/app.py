"""The router service: each StepRequest becomes a model call, or a cache hit, on the model its
routing policy picks (deploy/routing.toml [policies]: rules, fixed, learned, cascade; see
services/router/policies). A cascade whose validator rejects the weak answer makes a second call
on the strong model; each call is enforced, metered and cached on its own.

Queue group ``router`` on ``mesh.step.request``; the reply is always an InferenceResult (an
error one when the step cannot run), or ``Bus.rejection`` for a message that is not a step.

Before a paid call starts, the router enforces the cost defences that act at the caller: the
kill switch (a tripped switch covering the call: ``killed``), pacing (ahead of the month's curve:
one tier down, and under "throttle" a per-tenant rate of paid calls) and the reservation of the
call's worst case with the accountant (refused: ``refused``). After the call it settles the
metered cost. A call that never started is metered once, at $0, with its outcome.

Spillover (services/router/load.py): the router follows each local model's load
(``mesh.local.load.>``, published by local-inference) and, when a call on a local model would
finish past the step's deadline behind the engine's queue, sends it one tier up inside the
allow-list instead. The request, its usage row and the result carry ``spilled_from`` = the local
model. No spill while pacing says spend less, onto a model a kill switch blocks, or when the local
model's answer is cached; a spilled call the accountant refuses runs locally after all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextvars import ContextVar

import msgspec
import nats.errors
import structlog
from faststream import FastStream

from schemas.messages import (
    ErrorInfo,
    ErrorKind,
    InferenceRequest,
    InferenceResult,
    LocalLoad,
    Outcome,
    PaceSignal,
    Reservation,
    StepRequest,
    Tier,
    Usage,
    UsageEvent,
    UsageSource,
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
from services.router.load import DEFAULT_STALE_S, LoadBoard, spill_target
from services.routing.policies import PolicySet, execute
from services.routing.table import PinningError, RoutingTable
from services.router.throttle import DEFAULT_BURST, DEFAULT_RATE_PER_S, Throttle
from services.runtime.bus import Bus, Message, encode, now_ms
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.control import ControlState
from services.runtime.reservations import HEADER_BUDGET, UNAVAILABLE, ReservationClient, is_paid, parse_budget
from services.runtime.settings import MeshSettings
from services.runtime.tokens import count_message_tokens

SERVICE = "router"
QUEUE = "router"
# A cached answer is as good as the call that made it, but models and prompts drift: a day
# bounds how stale a served answer can be while still catching a day's repeats.
DEFAULT_CACHE_TTL_S = 24 * 3600.0
# Steps handled at once per replica: a step mostly waits on the accountant and a model, and a
# throttled tenant's queued steps must not hold up other tenants'.
DEFAULT_CONCURRENCY = 64

# The local model the call being made spilled from ("" for a call on the model the policy chose);
# set by Router.route around a spilled call, read where the request and usage rows are built.
_spilled_from: ContextVar[str] = ContextVar("spilled_from", default="")


class Router:
    """The per-step logic, apart from FastStream so that it reads top to bottom."""

    def __init__(
        self,
        bus: Bus,
        policies: PolicySet,
        catalog: Catalog,
        cache_ttl_s: float,
        throttle: Throttle,
        load: LoadBoard | None = None,
    ) -> None:
        self.bus = bus
        self.policies = policies
        self.catalog = catalog
        self.cache_ttl_s = cache_ttl_s
        self.throttle = throttle
        self.load = load or LoadBoard()
        self.reservations = ReservationClient(bus)
        self.log = bus.log
        self.cache: ResponseCache | None = None
        self.control: ControlState | None = None

    async def start(self) -> None:
        """Open the cache and read the control state before any step is taken: a router started
        after a trip refuses from its first step."""
        kv = await self.bus.broker.key_value(self.bus.subjects.bucket(BUCKET_RESPONSE_CACHE), ttl=self.cache_ttl_s)
        self.cache = ResponseCache(kv, self.log)
        self.control = await ControlState.open(self.bus.broker.connection.jetstream(), self.bus.subjects)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()

    async def route(
        self, step: StepRequest, traceparent: str | None = None, task_budget_usd: float | None = None
    ) -> InferenceResult:
        assert self.cache is not None and self.control is not None, "start runs at startup, before any subscriber"
        pace = self.control.pace(step.tenant)

        async def call(model: ModelSpec) -> InferenceResult:
            if model.service != "local":
                return await self._run(step, model, traceparent, pace, task_budget_usd)
            target = await self._spill_target(step, model, pace)
            if target is not None:
                marked = _spilled_from.set(model.name)
                try:
                    spilled = await self._run(step, target, traceparent, pace, task_budget_usd)
                finally:
                    _spilled_from.reset(marked)
                spilled = msgspec.structs.replace(spilled, spilled_from=model.name)
                if spilled.error is None or spilled.error.kind not in ("refused", "killed"):
                    return spilled
                # Not started (a cap or a switch on the bigger model): the local queue is still an answer.
                self.log.info("spill_refused", model=model.name, to=target.name, reason=spilled.error.message)
            self.load.pending[model.name] += 1
            try:
                return await self._run(step, model, traceparent, pace, task_budget_usd)
            finally:
                self.load.pending[model.name] -= 1

        try:
            # The step's policy (deploy/routing.toml [policies]) decides; a cascade may call twice.
            return await execute(
                self.policies.for_step(step),
                step,
                self.catalog,
                call,
                downgrade=pace is not None and pace.action in ("downgrade", "throttle"),
            )
        except PinningError as exc:
            # Nothing is sent, so nothing is spent or metered: the planner sees why.
            self.log.warning("pinning_refused", task_id=step.task_id, step_id=step.step_id, error=str(exc))
            return InferenceResult(
                call_id=uuid.uuid4().hex, model="", tier=exc.tier, error=ErrorInfo(kind="pinning", message=str(exc))
            )

    async def _spill_target(self, step: StepRequest, model: ModelSpec, pace: PaceSignal | None) -> ModelSpec | None:
        """The model to run ``step`` on instead of the local ``model`` when its queue would break
        the step's deadline; None to stay local."""
        assert self.cache is not None and self.control is not None
        estimate = self.load.estimate(model, step.max_tokens)
        remaining_s = (step.deadline_ms - now_ms()) / 1000
        if estimate is None or not estimate.breaks(remaining_s):
            return None
        decision = {
            "model": model.name,
            "ahead": estimate.ahead,
            "finish_s": round(estimate.finish_s, 3),
            "remaining_s": round(remaining_s, 3),
            "tokens_per_s": round(estimate.decode_tokens_per_s, 1),
        }
        target = spill_target(model, step.allow_models, self.catalog)
        if target is None:
            self.log.info("spill_not_allowed", allow_models=step.allow_models, **decision)
            return None
        if pace is not None and pace.action in ("downgrade", "throttle"):
            # Ahead of the month's curve the mesh spends less, not more: the call stays local.
            self.log.info("spill_paced", to=target.name, pace=pace.action, **decision)
            return None
        if self.control.blocked(tenant=step.tenant, task_id=step.task_id, model=target.name) is not None:
            return None
        if await self.cache.get(cache_key(model.name, step)) is not None:
            return None  # the local answer is cached: instant and free
        self.log.info("spilled", to=target.name, task_id=step.task_id, step_id=step.step_id, **decision)
        return target

    def on_load(self, load: LocalLoad) -> None:
        self.load.update(load)

    async def _run(
        self,
        step: StepRequest,
        model: ModelSpec,
        traceparent: str | None,
        pace: PaceSignal | None,
        task_budget_usd: float | None,
    ) -> InferenceResult:
        """One call on ``model``: from the cache, or enforced, sent and metered under its own call id."""
        assert self.cache is not None
        started = time.perf_counter()
        call_id = uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(task_id=step.task_id, call_id=call_id):
            key = cache_key(model.name, step)
            # A hit spends nothing, so neither the kill switch nor pacing holds it back.
            cached = await self.cache.get(key)
            if cached is not None:
                return await self._serve_cached(step, model, cached, call_id, started)
            if step.deadline_ms <= now_ms():
                return self._expired(model, call_id)
            if is_paid(model):
                result = await self._paid_call(step, model, call_id, started, traceparent, pace, task_budget_usd)
            else:
                result = await self._call(step, model, call_id, started, traceparent, reservation_id=None)
            if result.error is None:
                await self.cache.put(key, result)
            return result

    async def _serve_cached(
        self, step: StepRequest, model: ModelSpec, cached: InferenceResult, call_id: str, started: float
    ) -> InferenceResult:
        latency_ms = (time.perf_counter() - started) * 1000
        result = msgspec.structs.replace(
            cached,
            call_id=call_id,
            cache_hit=True,
            cost_usd=0.0,
            latency_ms=latency_ms,
            spilled_from=_spilled_from.get(),
        )
        # The tokens are the original call's, so analysts can see what the hit saved.
        await self._meter(
            step, call_id, cached.tier, cached.provider, cached.model, model.name, cached.usage, 0.0, latency_ms, "cache_hit"
        )
        self.log.debug("cache_hit", model=model.name)
        return result

    async def _paid_call(
        self,
        step: StepRequest,
        model: ModelSpec,
        call_id: str,
        started: float,
        traceparent: str | None,
        pace: PaceSignal | None,
        task_budget_usd: float | None,
    ) -> InferenceResult:
        """Kill switch, throttle, reservation, call, settle: in that order."""
        refusal = await self._admit(step, model, call_id, started, pace)
        if refusal is not None:
            return refusal
        input_tokens = count_message_tokens(model.tokenizer, step.messages)
        reservation = Reservation(
            id=call_id,
            tenant=step.tenant,
            task_id=step.task_id,
            model=model.name,
            amount_usd=model.worst_case_cost(input_tokens, step.max_tokens),
            # An unsettled hold lapses when the call can no longer be running.
            expires_ms=step.deadline_ms,
            task_budget_usd=task_budget_usd,
        )
        decision = await self.reservations.reserve(reservation, (step.deadline_ms - now_ms()) / 1000)
        if not decision.granted:
            # An accountant that did not answer may be back for the planner's retry; a cap will not move.
            retryable = decision.reason.startswith(UNAVAILABLE)
            return await self._not_started(step, model, call_id, started, "refused", decision.reason, retryable)
        result = await self._call(step, model, call_id, started, traceparent, reservation_id=reservation.id)
        # Errors and timeouts settle at what they were metered at, so the books and the budget agree.
        await self.reservations.settle(reservation, result.cost_usd)
        return result

    async def _admit(
        self, step: StepRequest, model: ModelSpec, call_id: str, started: float, pace: PaceSignal | None
    ) -> InferenceResult | None:
        """None when a paid call may go on to reserve; else the result of a call that never started."""
        assert self.control is not None
        switch = self.control.blocked(tenant=step.tenant, task_id=step.task_id, model=model.name)
        if switch is None and pace is not None and pace.action == "throttle":
            wait_s = self.throttle.take(step.tenant, within_s=(step.deadline_ms - now_ms()) / 1000)
            if wait_s is None:
                message = (
                    f"tenant {step.tenant} is throttled (month-to-date ${pace.spend_usd:.4f} is ahead of "
                    f"the curve's ${pace.curve_usd:.4f}) and its next call slot is past the step's deadline"
                )
                return await self._not_started(step, model, call_id, started, "refused", message, False)
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                # The switch may have tripped while this call waited for its slot.
                switch = self.control.blocked(tenant=step.tenant, task_id=step.task_id, model=model.name)
        if switch is not None:
            message = f"kill switch tripped ({switch.scope} {switch.key}): {switch.reason}"
            return await self._not_started(step, model, call_id, started, "killed", message, False)
        return None

    async def _not_started(
        self,
        step: StepRequest,
        model: ModelSpec,
        call_id: str,
        started: float,
        outcome: Outcome,
        message: str,
        retryable: bool,
    ) -> InferenceResult:
        """A paid call stopped before it was sent: one usage row at $0 (nothing was spent), so
        every refusal is counted, and an error result of the same kind."""
        self.log.warning("call_not_started", model=model.name, outcome=outcome, reason=message)
        kind: ErrorKind = "killed" if outcome == "killed" else "refused"
        error = ErrorInfo(kind=kind, message=message, retryable=retryable)
        return await self._meter_unanswered(step, model, call_id, started, outcome, error, None)

    @staticmethod
    def _expired(model: ModelSpec, call_id: str) -> InferenceResult:
        # Nothing was sent, so nothing can have been spent: no usage row, just the refusal.
        return InferenceResult(
            call_id=call_id,
            model=model.name,
            tier=model.tier,
            provider=model.provider,
            error=ErrorInfo(kind="timeout", message="the step's deadline passed before the call was sent"),
        )

    async def _call(
        self,
        step: StepRequest,
        model: ModelSpec,
        call_id: str,
        started: float,
        traceparent: str | None,
        reservation_id: str | None,
    ) -> InferenceResult:
        timeout_s = (step.deadline_ms - now_ms()) / 1000
        if timeout_s <= 0:
            # Checked again: the reservation or the throttle may have used up the time left.
            return self._expired(model, call_id)
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
            reservation_id=reservation_id,
            spilled_from=_spilled_from.get(),
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
        self.log.warning("call_failed", model=model.name, kind=kind, error=message)
        worst_case = Usage(input_tokens=count_message_tokens(model.tokenizer, step.messages), output_tokens=step.max_tokens)
        # Another replica may be up by the time the planner retries; a timed-out step has no time left.
        error = ErrorInfo(kind=kind, message=message, retryable=kind == "unavailable")
        return await self._meter_unanswered(step, model, call_id, started, outcome, error, worst_case)

    async def _meter(
        self,
        step: StepRequest,
        call_id: str,
        tier: Tier,
        provider: str,
        model: str,
        requested_model: str,
        usage: Usage,
        cost_usd: float,
        latency_ms: float,
        outcome: Outcome,
        usage_source: UsageSource = "provider",
    ) -> None:
        """The usage row of a call the router answered itself (cache hit, refusal, no answer)."""
        await self.bus.publish_usage(
            UsageEvent(
                event_id=call_id,
                time_ms=now_ms(),
                tenant=step.tenant,
                task_id=step.task_id,
                step_id=step.step_id,
                call_id=call_id,
                service=SERVICE,
                tier=tier,
                provider=provider,
                model=model,
                requested_model=requested_model,
                input_tokens=usage.input_tokens,
                cached_input_tokens=usage.cached_input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=cost_usd,
                latency_ms=latency_ms,
                outcome=outcome,
                usage_source=usage_source,
                spilled_from=_spilled_from.get(),
            )
        )

    async def _meter_unanswered(
        self,
        step: StepRequest,
        model: ModelSpec,
        call_id: str,
        started: float,
        outcome: Outcome,
        error: ErrorInfo,
        estimated: Usage | None,
    ) -> InferenceResult:
        """The one usage row of a call no inference service answered, and its error result.
        ``estimated`` is the usage to charge when the call may have run; None when it never started."""
        latency_ms = (time.perf_counter() - started) * 1000
        usage = estimated or Usage()
        cost = model.worst_case_cost(usage.input_tokens, usage.output_tokens) if estimated else 0.0
        source: UsageSource = "estimated" if estimated else "provider"
        await self._meter(
            step, call_id, model.tier, model.provider, model.name, model.name, usage, cost, latency_ms, outcome, source
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
            error=error,
        )

def create_app(
    settings: MeshSettings,
    *,
    table: RoutingTable | None = None,
    catalog: Catalog | None = None,
    policies: PolicySet | None = None,
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
    throttle_rate_per_s: float = DEFAULT_RATE_PER_S,
    throttle_burst: int = DEFAULT_BURST,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    load_stale_s: float = DEFAULT_STALE_S,
) -> FastStream:
    """The router; ``table`` and ``catalog`` default to deploy/routing.toml and deploy/models.toml,
    ``policies`` to routing.toml's [policies] (the rules alone when it has none).
    ``throttle_*``: the paid calls per second (and burst) of a tenant whose pace says "throttle".
    ``load_stale_s``: how old a local model's load report may be and still steer spillover."""
    bus = Bus(settings, SERVICE)
    table = table or RoutingTable.load(settings.deploy_dir)
    catalog = catalog or Catalog.load(settings.deploy_dir)
    catalog.load_tokenizers()
    router = Router(
        bus,
        policies or PolicySet.load(settings.deploy_dir, table, catalog),
        catalog,
        cache_ttl_s,
        Throttle(throttle_rate_per_s, throttle_burst),
        LoadBoard(load_stale_s),
    )
    app = bus.app()
    # Registered after bus.app()'s own hook, which connects the broker; subscribers start after both.
    app.on_startup(router.start)
    app.after_shutdown(router.stop)

    @bus.broker.subscriber(settings.subjects.step_request, queue=QUEUE, max_workers=max_concurrency)
    async def on_step(msg: Message) -> bytes:
        step = await bus.decode(msg, StepRequest)
        if step is None:
            return bus.rejection(f"not a valid StepRequest; kept on {settings.subjects.dlq(SERVICE)}")
        try:
            # The tenant names the usage subject; a bad one must fail here, not after a paid call.
            token(step.tenant)
            # A task cap that cannot be read cannot be enforced: refuse the step rather than run it uncapped.
            task_budget_usd = parse_budget(msg.headers.get(HEADER_BUDGET))
        except ValueError as exc:
            await bus.dead_letter(msg.raw_message.subject, msg.body, msg.headers, str(exc))
            return bus.rejection(str(exc))
        return encode(await router.route(step, msg.headers.get(HEADER_TRACEPARENT), task_budget_usd))

    # Every replica needs every report: no queue group.
    @bus.broker.subscriber(settings.subjects.local_load_all)
    async def on_local_load(msg: Message) -> None:
        load = await bus.decode(msg, LocalLoad)
        if load is not None:
            router.on_load(load)

    return app
