"""A step, routed: the step's policy picks the model (the one the step names, a virtual key's, else
deploy/routing.toml [policies]: rules, fixed, learned, cascade; services/routing/policies), and
each call it makes runs through services/router/calls.py. A cascade whose validator rejects the
weak answer makes a second call on the strong model; each call is enforced, metered and cached on
its own. Every call carries the step's options, ``stream_to``, virtual key and agent, except that a
streamed cascade streams only its escalation (services/router/cascade_stream.py).

An agent's step (``agent`` set) is counted by layer 2 before its first call does anything, and may
be refused there (services/router/agent_calls.py).

A step routed by the ``online`` policy may be shadowed once answered: the same step on the weak
model, off the critical path, judged into a label (services/router/shadow.py).

Pacing steers the choice: a tenant whose pace says "downgrade" or "throttle" gets the model one tier
down inside its allow-list.

Spillover: a call on a local model goes one tier up instead (inside the allow-list) when the
engine's queue would make it finish past the step's deadline (the estimate: services/router/load.py).
The request, its usage row and the result then carry ``spilled_from`` = the local model. A call does
not spill while pacing says spend less (ahead of the month's curve the mesh spends less, not more),
onto a model a kill switch blocks, or when the local model's answer is cached (instant and free);
a spilled call that the accountant refuses or a switch kills runs locally after all, since the local
queue is still an answer.
"""

from __future__ import annotations

import uuid

import msgspec

from schemas.messages import ErrorInfo, InferenceResult, LocalLoad, PaceSignal, StepRequest
from schemas.subjects import BUCKET_RESPONSE_CACHE
from services.router.agent_calls import AgentCallLimits
from services.router.cache import CacheConfig, ResponseCache, cache_key, cacheable
from services.router.calls import CallRunner
from services.router.cascade_stream import CascadeStream
from services.router.cost_defence import CostDefence
from services.router.load import LoadBoard, spill_target
from services.router.metering import CallMeter
from services.router.shadow import ShadowCalls
from services.router.throttle import Throttle
from services.routing.policies import Policy, PolicySet, execute
from services.routing.policies.cascade import CascadePolicy
from services.routing.table import PinningError
from services.runtime.bus import Bus, now_ms
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.control import ControlState
from services.runtime.reservations import ReservationClient
from services.runtime.task_calls import TaskCallCounter
from services.runtime.task_limits import TaskLimits

PACED = ("downgrade", "throttle")


class StepRouter:
    def __init__(
        self,
        bus: Bus,
        policies: PolicySet,
        catalog: Catalog,
        cache_ttl_s: float,
        throttle: Throttle,
        task_limits: TaskLimits,
        load: LoadBoard | None = None,
    ) -> None:
        self.bus = bus
        self.policies = policies
        self.catalog = catalog
        self.cache_ttl_s = cache_ttl_s
        # Read here, when the router is made, so a bad [cache] section stops it before it starts.
        self.cache_config = CacheConfig.load(bus.settings.deploy_dir)
        self.throttle = throttle
        self.task_limits = task_limits
        self.load = load or LoadBoard()
        self.log = bus.log
        self.cache: ResponseCache | None = None
        self.control: ControlState | None = None
        self.calls: CallRunner | None = None
        self.agent_calls: AgentCallLimits | None = None
        self.shadow: ShadowCalls | None = None

    async def start(self) -> None:
        """Open the cache and the task call counts and read the control state before any step is taken:
        a router started after a trip refuses from its first step."""
        bucket = self.bus.subjects.bucket(BUCKET_RESPONSE_CACHE)
        kv = await self.bus.key_value(bucket, ttl_s=self.cache_ttl_s)
        self.cache = ResponseCache(
            kv, self.bus, bucket, self.log, share_across_tenants=self.cache_config.share_across_tenants
        )
        self.control = await ControlState.open(self.bus)
        meter = CallMeter(self.bus)
        defence = CostDefence(self.control, self.throttle, ReservationClient(self.bus), meter)
        self.calls = CallRunner(self.bus, self.cache, defence, meter)
        self.shadow = ShadowCalls(self.bus, self.calls, self.catalog)
        self.agent_calls = AgentCallLimits(await TaskCallCounter.open(self.bus, self.task_limits, "agent"), meter)

    async def drain_shadows(self) -> None:
        """Let shadow calls in flight finish while the bus is still up (services/router/shadow.py)."""
        if self.shadow is not None:
            await self.shadow.stop()

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()

    def on_load(self, load: LocalLoad) -> None:
        self.load.update(load)

    async def route(
        self,
        step: StepRequest,
        traceparent: str | None = None,
        task_budget_usd: float | None = None,
        policy: Policy | None = None,
    ) -> InferenceResult:
        """``policy``: the step's, when the caller looked it up already (``PolicySet.for_step``)."""
        calls, control, agent_calls = self.calls, self.control, self.agent_calls
        assert calls is not None and control is not None and agent_calls is not None, "start runs before any step"
        pace = control.pace(step.tenant)
        policy = policy or self.policies.for_step(step)
        cascade = CascadeStream(step) if step.stream_to and isinstance(policy, CascadePolicy) else None

        async def model_call(model: ModelSpec) -> InferenceResult:
            sent = step
            if cascade is not None:
                next_step = cascade.next_step()
                if next_step is None:
                    return cascade.cancelled_call(model)
                sent = next_step

            async def run(on: ModelSpec, spilled_from: str = "") -> InferenceResult:
                return await calls.run(
                    sent,
                    on,
                    traceparent=traceparent,
                    pace=pace,
                    task_budget_usd=task_budget_usd,
                    spilled_from=spilled_from,
                )

            if model.service != "local":
                return await run(model)
            target = await self._spill_target(sent, model, pace)
            if target is not None:
                spilled = msgspec.structs.replace(await run(target, model.name), spilled_from=model.name)
                if spilled.error is None or spilled.error.kind not in ("refused", "killed"):
                    return spilled
                # Not started (a cap or a switch on the bigger model): the local queue is still an answer.
                self.log.info("spill_refused", model=model.name, to=target.name, reason=spilled.error.message)
            self.load.pending[model.name] += 1
            try:
                return await run(model)
            finally:
                self.load.pending[model.name] -= 1

        call = agent_calls.counted(step, model_call) if step.agent else model_call
        try:
            if cascade is not None:
                await cascade.open(self.bus)
            downgrade = pace is not None and pace.action in PACED
            result = await execute(policy, step, self.catalog, call, downgrade=downgrade)
            if self.shadow is not None:
                self.shadow.consider(step, policy, result, pace)  # off the critical path (services/router/shadow.py)
            return result
        except PinningError as exc:
            # Nothing is sent, so nothing is spent or metered: the planner sees why.
            self.log.warning("pinning_refused", task_id=step.task_id, step_id=step.step_id, error=str(exc))
            return InferenceResult(
                call_id=uuid.uuid4().hex, model="", tier=exc.tier, error=ErrorInfo(kind="pinning", message=str(exc))
            )
        finally:
            if cascade is not None:
                await cascade.close()

    async def _spill_target(self, step: StepRequest, model: ModelSpec, pace: PaceSignal | None) -> ModelSpec | None:
        """The model to run ``step`` on instead of the local ``model``; None to stay local."""
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
        if pace is not None and pace.action in PACED:
            self.log.info("spill_paced", to=target.name, pace=pace.action, **decision)
            return None
        if self.control.blocked(tenant=step.tenant, task_id=step.task_id, model=target.name, key_id=step.key_id):
            return None
        if cacheable(step) and await self.cache.get(cache_key(model.name, step)) is not None:
            return None
        self.log.info("spilled", to=target.name, task_id=step.task_id, step_id=step.step_id, **decision)
        return target
