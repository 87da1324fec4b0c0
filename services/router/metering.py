"""One model call the router makes for a step, and the usage rows of the calls the router ends itself.

An inference service meters every call it answers. The router meters only what no inference service
sees: a cache hit (at $0, with the original call's tokens, so analysts see what the hit saved), a
call it stopped before sending (refused by a cost defence or by layer 2 for an agent's call, or
killed: at $0, nothing was spent, but every refusal is counted) and a call no inference service
answered (at its worst case: whether it ran, and what it cost, is unknown here, and unknown usage is
never recorded as zero; if the inference service meters the same call too, both rows share
event_id = call id and JetStream keeps one). A call whose deadline passed before it was sent has no
row: nothing was sent, so nothing can have been spent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import msgspec

from schemas.messages import ErrorInfo, ErrorKind, InferenceResult, Outcome, StepRequest, Tier, Usage, UsageSource
from services.runtime.bus import Bus, now_ms
from services.runtime.catalog import ModelSpec
from services.runtime.usage import usage_event, worst_case_usage


@dataclass(frozen=True)
class ModelCall:
    """One call of ``step`` on ``model`` under its own call id: at most one usage row, one reservation."""

    step: StepRequest
    model: ModelSpec
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    # The local model this call spilled from ("" for a call on the model the policy chose).
    spilled_from: str = ""

    def time_left_s(self) -> float:
        return (self.step.deadline_ms - now_ms()) / 1000

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def expired(call: ModelCall) -> InferenceResult:
    """The result of a call whose deadline passed before it was sent (no usage row: nothing was spent)."""
    model = call.model
    return InferenceResult(
        call_id=call.call_id,
        model=model.name,
        tier=model.tier,
        provider=model.provider,
        error=ErrorInfo(kind="timeout", message="the step's deadline passed before the call was sent"),
    )


class CallMeter:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.log = bus.log

    async def cache_hit(self, call: ModelCall, cached: InferenceResult) -> InferenceResult:
        """Serve ``cached`` as this call's answer, free, and meter it ``cache_hit``."""
        latency_ms = call.elapsed_ms()
        result = msgspec.structs.replace(
            cached,
            call_id=call.call_id,
            cache_hit=True,
            cost_usd=0.0,
            latency_ms=latency_ms,
            spilled_from=call.spilled_from,
        )
        await self._publish(
            call, cached.tier, cached.provider, cached.model, cached.usage, 0.0, latency_ms, "cache_hit", "provider"
        )
        self.log.debug("cache_hit", model=call.model.name)
        return result

    async def not_started(self, call: ModelCall, error: ErrorInfo) -> InferenceResult:
        """A call stopped before it was sent, by a cost defence or layer 2: a $0 row (outcome ``killed``
        for a kill switch, else ``refused``) and an error result."""
        outcome: Outcome = "killed" if error.kind == "killed" else "refused"
        self.log.warning("call_not_started", model=call.model.name, outcome=outcome, reason=error.message)
        return await self._unanswered(call, outcome, error, None)

    async def failed(self, call: ModelCall, kind: ErrorKind, outcome: Outcome, message: str) -> InferenceResult:
        """A call sent that no inference service answered: an error result, metered at the worst case."""
        self.log.warning("call_failed", model=call.model.name, kind=kind, error=message)
        worst_case = worst_case_usage(call.model, call.step.messages, call.step.max_tokens, call.step.options.tools)
        # Another replica may be up by the time the planner retries; a timed-out step has no time left.
        error = ErrorInfo(kind=kind, message=message, retryable=kind == "unavailable")
        return await self._unanswered(call, outcome, error, worst_case)

    async def _unanswered(
        self, call: ModelCall, outcome: Outcome, error: ErrorInfo, estimated: Usage | None
    ) -> InferenceResult:
        """The one usage row of a call no inference service answered, and its error result.
        ``estimated`` is the usage to charge when the call may have run; None when it never started."""
        model = call.model
        latency_ms = call.elapsed_ms()
        usage = estimated or Usage()
        cost = model.worst_case_cost(usage.input_tokens, usage.output_tokens) if estimated else 0.0
        source: UsageSource = "estimated" if estimated else "provider"
        await self._publish(call, model.tier, model.provider, model.name, usage, cost, latency_ms, outcome, source)
        # The reply carries the metered cost too, so the planner's running total matches the books.
        return InferenceResult(
            call_id=call.call_id,
            model=model.name,
            tier=model.tier,
            provider=model.provider,
            usage=usage,
            latency_ms=latency_ms,
            cost_usd=cost,
            error=error,
        )

    async def _publish(
        self,
        call: ModelCall,
        tier: Tier,
        provider: str,
        model: str,
        usage: Usage,
        cost_usd: float,
        latency_ms: float,
        outcome: Outcome,
        usage_source: UsageSource,
    ) -> None:
        event = usage_event(
            call.step,
            call.call_id,
            service=self.bus.service,
            tier=tier,
            provider=provider,
            model=model,
            requested_model=call.model.name,
            usage=usage,
            cost_usd=cost_usd,
            latency_ms=latency_ms,
            outcome=outcome,
            usage_source=usage_source,
            spilled_from=call.spilled_from,
        )
        await self.bus.publish_usage(event)
