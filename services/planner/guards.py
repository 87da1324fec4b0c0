"""The defences around a task's model calls: the pre-flight check, the budget, the deadline, layer 2.

Each stops work before it is paid for, and says why (the task announces it as a ``refused``
event just before its terminal event):

- Before any call: the pre-flight estimate must fit the task's budget and remaining time
  (``preflight_refusal``); the attempts per day are counted apart (services/planner/antiloop.py).
- Between steps: no new step starts once the budget is spent (``over_budget``).
- Before each call (``CallGuard``): the call's worst-case cost must fit what is left of the budget,
  counting calls in flight; its model's typical latency must fit the time left; and the same call
  (role and messages) may not repeat more than ``limits.identical_calls`` times in the task.
- Around each call: a retryable error (a router restarting, a retryable inference error) is tried
  again, up to ``limits.step_attempts`` calls in all.

A refusal never overruns: the calls already in flight finish, and nothing new is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping

import msgspec

from schemas.messages import InferenceResult, StepRequest
from services.planner.clients import RouterClient
from services.planner.config import Limits
from services.planner.estimate import fits
from services.planner.preflight import AgentFigures, Preflight, describe
from services.planner.prompts import artifact_text, distinct
from services.planner.state import StepFailed, TaskState
from services.routing.table import PinningError

# A router that is briefly absent (restarting) is worth a retry, after this pause.
NO_RESPONDERS_PAUSE_S = 0.2


def preflight_refusal(
    preflight: Preflight, state: TaskState, fanout: int, agents: Mapping[str, AgentFigures | None]
) -> str | None:
    """Why the plan cannot fit the task's budget or remaining time, or None when it can (``agents``:
    the figures of the live agents its agent steps name)."""
    task = state.task
    # Without a budget no decision reads the cost, so the prompts' tokens are not counted (Preflight.call).
    priced = task.budget_usd is not None
    try:
        steps = preflight.steps(
            state.workflow,
            task.goal,
            task.allow_models,
            task.max_tokens,
            items=[artifact_text(a) for a in distinct(state.inputs)],
            fanout=fanout,
            agents=agents,
            priced=priced,
        )
    except PinningError as exc:
        return f"pre-flight estimate: {exc}"
    figures = Preflight.total(steps)
    reason = fits(figures, task.budget_usd, state.left_s())
    if reason is None:
        return None
    return f"pre-flight estimate: {reason} (plan: {describe(figures, priced)})"


def over_budget(state: TaskState) -> StepFailed | None:
    """Why no new step may start (the task's budget is spent), or None."""
    budget = state.task.budget_usd
    if budget is not None and state.cost_usd >= budget:
        return StepFailed(f"budget spent: ${state.cost_usd:.6f} of ${budget:.6f}", kind="budget")
    return None


class CallGuard:
    """Sends a task's model calls through the per-call defences, retrying what may be retried."""

    def __init__(self, router: RouterClient, preflight: Preflight, limits: Limits) -> None:
        self.router = router
        self.preflight = preflight
        self.limits = limits

    async def answer(
        self, state: TaskState, request: StepRequest, results: list[InferenceResult], loop_key: str = ""
    ) -> InferenceResult:
        """One answer to ``request``: up to ``limits.step_attempts`` calls while errors are retryable.
        Every result is appended to ``results``; the step fails when no attempt succeeds.
        ``loop_key`` sets a deliberate repeat (an escalation) apart from a loop."""
        attempt = 0
        while True:
            attempt += 1
            request.attempt += 1
            may_retry = attempt < self.limits.step_attempts
            try:
                result = await self.call(state, request, loop_key)
            except StepFailed as exc:
                if not (exc.retryable and may_retry):
                    raise
                await asyncio.sleep(NO_RESPONDERS_PAUSE_S)
                continue
            results.append(result)
            state.cost_usd += result.cost_usd
            if result.error is None:
                return result
            if not (result.error.retryable and may_retry):
                raise StepFailed(f"{result.error.kind}: {result.error.message}", result.error.kind)

    async def call(self, state: TaskState, request: StepRequest, loop_key: str = "") -> InferenceResult:
        """One call to the router, once it passes the per-call defences (identical calls, budget, deadline)."""
        self._count_identical(state, request, loop_key)
        budget = state.task.budget_usd
        try:
            worst_usd, latency_s = self.preflight.call(request, priced=budget is not None)
        except PinningError:
            # The router refuses it with the reason; nothing is spent.
            return await self.router.call(state, request)
        left_s = state.left_s()
        if latency_s > left_s:
            raise StepFailed(
                f"deadline would be exceeded: a call takes about {latency_s:g} s and {max(left_s, 0):.2f} s are left",
                kind="deadline",
            )
        if budget is not None and state.cost_usd + state.in_flight_usd + worst_usd > budget:
            raise StepFailed(
                f"budget would be exceeded: the call may cost ${worst_usd:.6f}, with ${state.cost_usd:.6f} spent "
                f"and ${state.in_flight_usd:.6f} in flight of ${budget:.6f}",
                kind="budget",
            )
        state.in_flight_usd += worst_usd
        try:
            return await self.router.call(state, request)
        finally:
            state.in_flight_usd -= worst_usd

    def _count_identical(self, state: TaskState, request: StepRequest, loop_key: str) -> None:
        """Count this call; StepFailed (``loop``) once the same call would go out too often in the task."""
        # Whatever model runs it: a repeat on another model is the same loop. An escalation (bounded:
        # once per call of a step) is the planner's own decision, counted apart.
        parts = [request.role, request.messages, loop_key] if loop_key else [request.role, request.messages]
        key = hashlib.sha256(msgspec.json.encode(parts)).hexdigest()
        state.call_counts[key] += 1
        if state.call_counts[key] > self.limits.identical_calls:
            raise StepFailed(
                f"layer 2 (anti-loop): the same call (role {request.role!r}, same messages) would be sent "
                f"{state.call_counts[key]} times in this task; the limit is {self.limits.identical_calls}",
                kind="loop",
            )
