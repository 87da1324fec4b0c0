"""Shadow calls: the online policy's way to learn, off the caller's critical path.

After a step routed by the ``online`` policy has its answer (and the caller has it: the reply does
not wait), the policy may ask for the same step on the other model (``OnlinePolicy.shadow_model``:
its shadow share, per tag until the tag has enough labels). The shadow call runs as any call
does (cache, kill switch, reservation, metering), with two differences:

- it carries the virtual key id ``shadow`` (``SHADOW_KEY``), so its usage rows say what learning
  costs (``key_id = 'shadow'`` in ClickHouse, view ``key_spend_daily``) and it has its own cap:
  `frugalmesh budget set --scope key --key shadow --cap 5 --window day`; the tenant's caps bind it
  too, the task's own cap does not (learning is the mesh's spend, not the task's);
- it never streams, and a tenant whose pace says spend less gets no shadow calls.

A judge turns the pair into a label: recorded grades when the inference service reports them
(the replay backend's ``graded``: "recorded labels in replay"), else the router file's cascade
validator on the weak answer, the strong answer taken as its reference. The label goes to the
policy at once (``OnlinePolicy.learn``) and, as two ``Feedback`` messages (one per call, tagged
with the step's workflow), to ClickHouse, where `frugalmesh router train --from-clickhouse` reads
it. Deliberately not done: a judge model comparing the two answers (a paid call per label; a
validator or recorded grades were what the data here supports).
"""

from __future__ import annotations

import asyncio

import msgspec

from schemas.messages import FeedbackSource, InferenceResult, PaceSignal, StepRequest
from services.router.calls import CallRunner
from services.routing.policies import Policy
from services.routing.policies.online import OnlinePolicy, step_tag
from services.runtime.bus import Bus
from services.runtime.catalog import Catalog
from services.runtime.feedback import new_feedback, publish_feedback

SHADOW_KEY = "shadow"
PACED = ("downgrade", "throttle")
STOP_WAIT_S = 10.0


def judge(
    policy: OnlinePolicy, routed: InferenceResult, shadow: InferenceResult
) -> tuple[bool, bool, FeedbackSource] | None:
    """(weak answer right, strong answer right, who judged), or None when nothing can judge the pair."""
    weak, strong = (routed, shadow) if routed.model == policy.weak_model else (shadow, routed)
    if weak.graded is not None and strong.graded is not None:
        return weak.graded, strong.graded, "label"
    if policy.validator is not None:
        return policy.validator.score(weak.output) >= policy.validator.calibration.threshold, True, "validator"
    return None


class ShadowCalls:
    def __init__(self, bus: Bus, calls: CallRunner, catalog: Catalog) -> None:
        self.bus = bus
        self.calls = calls
        self.catalog = catalog
        self.running: set[asyncio.Task[None]] = set()

    def consider(self, step: StepRequest, policy: Policy, result: InferenceResult, pace: PaceSignal | None) -> None:
        """Start the shadow call of an answered step when its policy asks for one; returns at once."""
        if not isinstance(policy, OnlinePolicy) or result.error is not None:
            return
        routed = self.catalog.models.get(result.model)
        if routed is None or (pace is not None and pace.action in PACED):
            return
        model = policy.shadow_model(step, routed, self.catalog)
        if model is None:
            return
        quiet = msgspec.structs.replace(step, stream_to="", key_id=SHADOW_KEY)
        task = asyncio.create_task(self._shadow(quiet, policy, result, model.name))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _shadow(self, step: StepRequest, policy: OnlinePolicy, routed: InferenceResult, model: str) -> None:
        try:
            answer = await self.calls.run(
                step, self.catalog.model(model), traceparent=None, pace=None, task_budget_usd=None
            )
            if answer.error is not None:
                self.bus.log.info("shadow_failed", task_id=step.task_id, model=model, error=answer.error.message)
                return
            verdict = judge(policy, routed, answer)
            if verdict is None:
                self.bus.log.info("shadow_unjudged", task_id=step.task_id, model=model)
                return
            weak_right, strong_right, source = verdict
            tag = step_tag(step)
            policy.learn(tag, weak_right, strong_right)
            for call in (routed, answer):
                right = weak_right if call.model == policy.weak_model else strong_right
                verdict_message = new_feedback(
                    tenant=step.tenant,
                    score=float(right),
                    source=source,
                    call_id=call.call_id,
                    task_id=step.task_id,
                    tag=tag,
                )
                await publish_feedback(self.bus, verdict_message)
        except Exception as exc:  # a lost label is a lost lesson, never the caller's failure
            self.bus.log.warning("shadow_error", task_id=step.task_id, model=model, error=repr(exc))

    async def stop(self) -> None:
        """Let shadow calls in flight finish (their spend is reserved and must be settled)."""
        if self.running:
            await asyncio.wait(list(self.running), timeout=STOP_WAIT_S)
