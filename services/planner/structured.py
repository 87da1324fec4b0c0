"""A structured step's body: validated against its artifact type, asked again, then escalated once.

A model writes a structured artifact as JSON (schemas/artifacts.py). An output that does not
validate is not stored. The same call again would get the same answer (temperature 0, and the
router's cache), so the model is shown its reply and the validation error and asked again, up to
the step's ``invalid_retries`` times (a ``step_started`` event for each, its detail saying why).
Then, when the step names an ``escalate_to`` tier, the original request goes once to that tier's
models the task allows (an ``escalated`` event): the stronger model starts afresh. When none of
that validates the step fails with kind ``invalid``. Every call is kept in ``results``, so the
artifact's ``calls`` and cost include the ones whose output was thrown away.
"""

from __future__ import annotations

import msgspec

from schemas.artifacts import ArtifactError, parse_structured
from schemas.messages import ChatMessage, InferenceResult, StepRequest, Tier
from services.planner.events import EventPublisher
from services.planner.guards import CallGuard
from services.planner.state import StepFailed, TaskState
from services.planner.workflow import StepSpec
from services.runtime.catalog import Catalog

# What a model is told when its structured output did not validate, before it answers again.
INVALID_FEEDBACK = "That reply is invalid: {error}. Reply again with only the JSON object the schema asks for."


class StructuredOutput:
    """Gets a valid body of a structured step's type, within the step's retries and escalation."""

    def __init__(self, calls: CallGuard, events: EventPublisher, catalog: Catalog) -> None:
        self.calls = calls
        self.events = events
        self.catalog = catalog

    async def body(
        self, state: TaskState, step: StepSpec, request: StepRequest, results: list[InferenceResult], input_id: str
    ) -> dict:
        """A body of the step's structured type, validated: the answer to ``request``; while it is
        invalid, asked again with the error (``invalid_retries`` times) on the same models; then
        once on the ``escalate_to`` tier. Raises StepFailed (kind ``invalid``) when none validates."""

        def parse(result: InferenceResult) -> dict:
            return parse_structured(step.artifact, result.output, input=input_id, model=result.model)

        result = await self.calls.answer(state, request, results)
        try:
            return parse(result)
        except ArtifactError as exc:
            error = str(exc)
        retries = step.retries_when_invalid
        current = request
        for retry in range(1, retries + 1):
            await self.events.emit(
                state.task,
                "step_started",
                step_id=request.step_id,
                detail=f"retry {retry} of {retries} on {result.model}: the output is invalid: {error}",
                totals=state.totals(),
            )
            feedback = [
                ChatMessage(role="assistant", content=result.output),
                ChatMessage(role="user", content=INVALID_FEEDBACK.format(error=error)),
            ]
            current = msgspec.structs.replace(
                request, messages=[*request.messages, *feedback], attempt=current.attempt
            )
            result = await self.calls.answer(state, current, results)
            try:
                return parse(result)
            except ArtifactError as exc:
                error = str(exc)
        invalid = f"the output of {result.model} is invalid after {retries} retries: {error}"
        tier = step.escalate_to
        if tier is None:
            raise StepFailed(invalid, kind="invalid")
        models = self.escalation_models(state, tier)
        if not models:
            raise StepFailed(f"{invalid}; no {tier} model is allowed to escalate to (allow_models)", kind="invalid")
        await self.events.emit(
            state.task,
            "escalated",
            step_id=request.step_id,
            detail=f"to tier {tier} ({', '.join(models)}): {invalid}",
            totals=state.totals(),
        )
        # The original request, on the next tier: the stronger model starts afresh.
        escalated = msgspec.structs.replace(request, allow_models=models, attempt=current.attempt)
        result = await self.calls.answer(state, escalated, results, loop_key=f"escalated to {tier}")
        try:
            return parse(result)
        except ArtifactError as exc:
            raise StepFailed(
                f"the output is invalid, escalated to tier {tier} too ({result.model}): {exc}", kind="invalid"
            ) from None

    def escalation_models(self, state: TaskState, tier: Tier) -> list[str]:
        """The models of ``tier`` the task allows (the router takes the cheapest)."""
        allow = state.task.allow_models
        return sorted(m.name for m in self.catalog.in_tier(tier) if allow is None or m.name in allow)
