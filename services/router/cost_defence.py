"""The cost defences the router applies to a paid call (price > 0) before it is sent, in this order:

1. the kill switch: a tripped switch covering the tenant, task, model or virtual key stops the call
   (``killed``);
2. pacing's throttle: a tenant whose pace says "throttle" waits for its next call slot
   (services/router/throttle.py); a slot past the step's deadline refuses the call (``refused``),
   and the switch is read again after the wait, since it may have tripped meanwhile;
3. the reservation: the call's worst case (input tokens counted with the model's tokenizer, plus
   ``max_tokens`` of output, at list price) is reserved with the accountant (naming the call's virtual
   key, whose caps bind too), the hold lapsing at the step's deadline; a refusal, or no answer
   (services/runtime/reservations.py fails closed), refuses the call. Only "no answer" is retryable:
   the accountant may be back for the planner's retry, a cap will not move.

Then the call is sent with the grant the accountant signed for it (``ReservationDecision.grant``,
services/runtime/grants.py), without which the inference service refuses a paid call, and its
reservation settled at the metered cost, errors and timeouts included,
so the books and the budget agree. A call stopped here is metered once, at $0 (services/router/metering.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from schemas.messages import ErrorInfo, InferenceResult, KillSwitch, PaceSignal, Reservation
from services.router.metering import CallMeter, ModelCall
from services.router.throttle import Throttle
from services.runtime.control import ControlState, killed_message
from services.runtime.grants import prompt_digest
from services.runtime.reservations import UNAVAILABLE, ReservationClient
from services.runtime.tokens import count_prompt_tokens

# Sends a call, with the id of its reservation and the accountant's grant (None and "" for a free call).
Send = Callable[[ModelCall, str | None, str], Awaitable[InferenceResult]]


class CostDefence:
    def __init__(self, control: ControlState, throttle: Throttle, reservations: ReservationClient, meter: CallMeter):
        self.control = control
        self.throttle = throttle
        self.reservations = reservations
        self.meter = meter

    async def paid_call(
        self, call: ModelCall, pace: PaceSignal | None, task_budget_usd: float | None, send: Send
    ) -> InferenceResult:
        """Kill switch, throttle, reservation, ``send``, settle."""
        refusal = await self._admit(call, pace)
        if refusal is not None:
            return refusal
        step, model = call.step, call.model
        input_tokens = count_prompt_tokens(model.tokenizer, step.messages, step.options.tools)
        reservation = Reservation(
            id=call.call_id,
            tenant=step.tenant,
            task_id=step.task_id,
            model=model.name,
            amount_usd=model.worst_case_cost(input_tokens, step.max_tokens),
            # An unsettled hold lapses when the call can no longer be running.
            expires_ms=step.deadline_ms,
            task_budget_usd=task_budget_usd,
            key_id=step.key_id,
            prompt_digest=prompt_digest(step.messages, step.options.tools, step.max_tokens),
        )
        decision = await self.reservations.reserve(reservation, call.time_left_s())
        if not decision.granted:
            retryable = decision.reason.startswith(UNAVAILABLE)
            return await self.meter.not_started(
                call, ErrorInfo(kind="refused", message=decision.reason, retryable=retryable)
            )
        result = await send(call, reservation.id, decision.grant)
        await self.reservations.settle(reservation, result.cost_usd)
        return result

    def _blocked(self, call: ModelCall) -> KillSwitch | None:
        step = call.step
        return self.control.blocked(tenant=step.tenant, task_id=step.task_id, model=call.model.name, key_id=step.key_id)

    async def _admit(self, call: ModelCall, pace: PaceSignal | None) -> InferenceResult | None:
        """None when a paid call may go on to reserve; else the result of a call that never started."""
        step = call.step
        switch = self._blocked(call)
        if switch is None and pace is not None and pace.action == "throttle":
            wait_s = self.throttle.take(step.tenant, within_s=call.time_left_s())
            if wait_s is None:
                message = (
                    f"tenant {step.tenant} is throttled (month-to-date ${pace.spend_usd:.4f} is ahead of "
                    f"the curve's ${pace.curve_usd:.4f}) and its next call slot is past the step's deadline"
                )
                return await self.meter.not_started(call, ErrorInfo(kind="refused", message=message))
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                switch = self._blocked(call)
        if switch is not None:
            return await self.meter.not_started(call, ErrorInfo(kind="killed", message=killed_message(switch)))
        return None
