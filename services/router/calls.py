"""One call of a step on a chosen model: from the response cache, or sent to the inference service.

The order is fixed: the exact-match cache first (services/router/cache.py; a hit spends nothing, so
neither the kill switch nor pacing holds it back), then the deadline (a call that can no longer
finish is not sent), then a paid call goes through the cost defences (services/router/cost_defence.py)
and a free one straight out. Only a successful answer is cached.

The request goes to ``mesh.infer.local.<model>`` or ``mesh.infer.cloud.<provider>``, carrying the
accountant's grant of a paid call, the step's options, virtual key, agent and ``stream_to`` (the
inference service streams the output there itself; a cache hit streams nothing, and its caller
takes the whole answer from the result), with the step's deadline as its time-out, and the headers
``Mesh-Deadline``, ``Mesh-Task``, ``Mesh-Tenant`` (and the caller's ``traceparent``). No responder,
no answer in time, or an unreadable one: the router meters the call itself, at its worst case
(services/router/metering.py).
"""

from __future__ import annotations

import msgspec
import nats.errors
import structlog

from schemas.messages import InferenceRequest, InferenceResult, PaceSignal, StepRequest
from schemas.subjects import HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT, HEADER_TRACEPARENT
from services.router.cache import ResponseCache, cache_key, cacheable
from services.router.cost_defence import CostDefence
from services.router.metering import CallMeter, ModelCall, expired
from services.runtime.bus import Bus, Rejected, now_ms
from services.runtime.catalog import ModelSpec
from services.runtime.reservations import is_paid


class CallRunner:
    def __init__(self, bus: Bus, cache: ResponseCache, defence: CostDefence, meter: CallMeter) -> None:
        self.bus = bus
        self.cache = cache
        self.defence = defence
        self.meter = meter

    async def run(
        self,
        step: StepRequest,
        model: ModelSpec,
        *,
        traceparent: str | None,
        pace: PaceSignal | None,
        task_budget_usd: float | None,
        spilled_from: str = "",
    ) -> InferenceResult:
        """One call on ``model``: from the cache, or enforced, sent and metered under its own call id."""
        call = ModelCall(step, model, spilled_from=spilled_from)
        with structlog.contextvars.bound_contextvars(task_id=step.task_id, call_id=call.call_id):
            key = cache_key(model.name, step) if cacheable(step) else None
            cached = await self.cache.get(key) if key is not None else None
            if cached is not None:
                return await self.meter.cache_hit(call, cached)
            if step.deadline_ms <= now_ms():
                return expired(call)

            async def send(call: ModelCall, reservation_id: str | None, grant: str) -> InferenceResult:
                return await self._send(call, traceparent, reservation_id, grant)

            if is_paid(model):
                result = await self.defence.paid_call(call, pace, task_budget_usd, send)
            else:
                result = await send(call, None, "")
            if result.error is None and key is not None:
                await self.cache.put(key, result)
            return result

    async def _send(
        self, call: ModelCall, traceparent: str | None, reservation_id: str | None, grant: str
    ) -> InferenceResult:
        step, model = call.step, call.model
        timeout_s = call.time_left_s()
        if timeout_s <= 0:
            # Checked again: the reservation or the throttle may have used up the time left.
            return expired(call)
        request = InferenceRequest(
            call_id=call.call_id,
            task_id=step.task_id,
            step_id=step.step_id,
            tenant=step.tenant,
            attempt=step.attempt,
            model=model.name,
            tier=model.tier,
            messages=step.messages,
            max_tokens=step.max_tokens,
            options=step.options,
            stream_to=step.stream_to,
            key_id=step.key_id,
            agent=step.agent,
            response_schema=step.response_schema,
            deadline_ms=step.deadline_ms,
            reservation_id=reservation_id,
            grant=grant,
            spilled_from=call.spilled_from,
        )
        headers = {HEADER_DEADLINE: str(step.deadline_ms), HEADER_TASK: step.task_id, HEADER_TENANT: step.tenant}
        if traceparent:
            headers[HEADER_TRACEPARENT] = traceparent
        try:
            return await self.bus.request(
                model.subject(self.bus.subjects), request, InferenceResult, timeout_s, headers
            )
        except nats.errors.NoRespondersError:
            return await self.meter.failed(call, "unavailable", "error", "no inference service answers")
        except TimeoutError:
            message = f"no result within the deadline ({timeout_s:.3f} s)"
            return await self.meter.failed(call, "timeout", "timeout", message)
        except Rejected as rejected:  # the inference service refused the request before any work
            return await self.meter.failed(call, "provider", "error", f"inference service refused the call: {rejected}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return await self.meter.failed(call, "provider", "error", f"unreadable InferenceResult: {exc}")
