"""The kinds of step a workflow has, each producing one stored artifact.

- A model step makes one call (more while its output matches ``retry_if``, up to the step's and
  the planner's ``max_loops``; a structured type goes through services/planner/structured.py).
- A ``select`` step makes no call: it keeps the candidate its review accepted, or takes the
  corrected answer the review wrote.
- An agent step asks the agent service it names (services/planner/agent_steps.py), holding one
  fan-out slot while the agent works.
- A step run once per task input (``for_each``) makes one call (or agent request) per distinct
  input, each holding one of the task's fan-out slots, so a task never has more calls in flight than its fan-out cap;
  once an item fails, no new item starts. Its result is a ``batch`` artifact of the items in the
  task's input order (an input given twice gets the same item).

Every call of a step is in its artifact's ``calls``, and its cost in the artifact's ``cost_usd``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from schemas.artifacts import ARTIFACT_TYPES, is_structured
from schemas.messages import Artifact, ArtifactRef, InferenceResult, StepRequest
from services.planner.agent_steps import AgentSteps
from services.planner.clients import ArtifactClient
from services.planner.config import Limits
from services.planner.events import EventPublisher
from services.planner.guards import CallGuard
from services.planner.prompts import artifact_text, placeholder_values, step_request
from services.planner.state import StepFailed, TaskState
from services.planner.structured import StructuredOutput
from services.planner.workflow import BATCH, ITEM, StepSpec
from services.runtime.bus import now_ms

_VERDICT_WORD = re.compile(r"[A-Za-z]+")


class StepRunner:
    """Runs one step of a task to its artifact, announcing its start and end."""

    def __init__(
        self,
        calls: CallGuard,
        structured: StructuredOutput,
        artifacts: ArtifactClient,
        events: EventPublisher,
        limits: Limits,
        agents: AgentSteps,
    ) -> None:
        self.agents = agents
        self.calls = calls
        self.structured = structured
        self.artifacts = artifacts
        self.events = events
        self.limits = limits

    async def run(self, state: TaskState, step: StepSpec) -> ArtifactRef:
        """The artifact of ``step`` (whose needs have theirs); raises StepFailed when it has none."""
        await self.events.emit(state.task, "step_started", step_id=step.id, totals=state.totals(), agent=step.agent)
        # An agent reads its needs itself, by reference.
        needs = [] if step.kind == "agent" else step.needs
        inputs = {need: await self.artifacts.get(state.refs[need].id) for need in needs}
        if step.kind == "select":
            ref = await self._select(state, step, inputs)
        elif step.for_each is not None:
            ref = await self._map_step(state, step, inputs)
        elif step.kind == "agent":
            async with state.slots:
                ref = await self.agents.run(state, step, step.id)
        else:
            ref = await self._model_step(state, step, inputs)
        state.keep(ref)
        await self.events.emit(
            state.task, "step_done", step_id=step.id, artifact=ref, totals=state.totals(), agent=step.agent
        )
        return ref

    async def _model_step(self, state: TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        values = await placeholder_values(self.artifacts, state, inputs)
        request = step_request(state, step, step.id, values)
        async with state.slots:
            body, results = await self._produce(state, step, request, input_id="")
        return await self._put(
            state,
            step,
            body,
            parents=[a.id for a in inputs.values()],
            calls=[r.call_id for r in results],
            cost_usd=sum(r.cost_usd for r in results),
        )

    async def _map_step(self, state: TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        """One call (agent request) per distinct task input (an identical input gets the same artifact), at
        most the fan-out cap at once; the result is a ``batch`` of the items in the task's input order."""
        produce: Callable[[int, Artifact], Awaitable[ArtifactRef]]
        if step.kind == "agent":

            async def produce(position: int, item: Artifact) -> ArtifactRef:
                ref = ArtifactRef(id=item.id, type=item.type)
                return await self.agents.run(state, step, f"{step.id}[{position}]", ref)
        else:
            values = await placeholder_values(self.artifacts, state, inputs)

            async def produce(position: int, item: Artifact) -> ArtifactRef:
                return await self._item(state, step, position, item, values)

        first_at: dict[str, int] = {}
        for position, artifact in enumerate(state.inputs):
            first_at.setdefault(artifact.id, position)
        by_id = {artifact.id: artifact for artifact in state.inputs}
        stopped: list[StepFailed] = []

        async def item(input_id: str) -> ArtifactRef:
            async with state.slots:
                if stopped:
                    raise _Skipped()
                try:
                    return await produce(first_at[input_id], by_id[input_id])
                except StepFailed as exc:
                    stopped.append(exc)
                    raise

        outcomes = await asyncio.gather(*(item(i) for i in first_at), return_exceptions=True)
        refs: dict[str, ArtifactRef] = {}
        for input_id, outcome in zip(first_at, outcomes, strict=True):
            if isinstance(outcome, ArtifactRef):
                refs[input_id] = outcome
            elif not isinstance(outcome, (StepFailed, _Skipped)):
                raise outcome
        if stopped:
            first = stopped[0]
            raise StepFailed(f"{first.reason} ({len(refs)} of {len(first_at)} items done)", first.kind)
        body = {
            "of": step.artifact,
            "items": [refs[a.id].id for a in state.inputs],
            "inputs": [a.id for a in state.inputs],
        }
        items = sorted({r.id for r in refs.values()})
        # The batch itself cost nothing: its items carry their calls and costs.
        return await self._put(state, step, body, parents=items, calls=[], cost_usd=0.0, artifact_type=BATCH)

    async def _item(
        self, state: TaskState, step: StepSpec, position: int, item: Artifact, values: dict[str, str]
    ) -> ArtifactRef:
        """The artifact of one input of a for_each step (the caller holds a fan-out slot)."""
        step_id = f"{step.id}[{position}]"
        request = step_request(state, step, step_id, {**values, ITEM: artifact_text(item)})
        body, results = await self._produce(state, step, request, input_id=item.id)
        ref = await self._put(
            state,
            step,
            body,
            parents=[item.id],
            calls=[r.call_id for r in results],
            cost_usd=sum(r.cost_usd for r in results),
            step_id=step_id,
        )
        state.keep(ref)
        return ref

    async def _produce(
        self, state: TaskState, step: StepSpec, request: StepRequest, input_id: str
    ) -> tuple[dict, list[InferenceResult]]:
        """The body of a model step's artifact and every call it took (the caller holds a slot)."""
        results: list[InferenceResult] = []
        if is_structured(step.artifact):
            return await self.structured.body(state, step, request, results, input_id), results
        loops = min(step.max_loops, self.limits.max_loops) if step.retry_if is not None else 0
        for _ in range(loops + 1):
            result = await self.calls.answer(state, request, results)
            if step.retry_if is None or not re.search(step.retry_if, result.output):
                break
        else:
            raise StepFailed(
                f"layer 2 (anti-loop): the output still matches retry_if {step.retry_if!r} after {loops} loops, "
                "the most this step may make",
                kind="loop",
            )
        schema_fields = ARTIFACT_TYPES[step.artifact].__struct_fields__
        produced = {
            "text": result.output,
            "model": result.model,
            "graded": result.graded,
            "verdict": verdict(result.output),
        }
        return {name: value for name, value in produced.items() if name in schema_fields}, results

    async def _select(self, state: TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        candidate, review = (inputs[need] for need in step.needs)
        if review.body["verdict"] == "accept":
            return state.refs[step.needs[0]]
        # The review rejected the candidate and wrote the corrected answer: that is the result.
        schema_fields = ARTIFACT_TYPES[step.artifact].__struct_fields__
        body = {name: value for name, value in review.body.items() if name in schema_fields}
        return await self._put(state, step, body, parents=[candidate.id, review.id], calls=[], cost_usd=0.0)

    async def _put(
        self,
        state: TaskState,
        step: StepSpec,
        body: dict,
        parents: list[str],
        calls: list[str],
        cost_usd: float,
        *,
        step_id: str | None = None,
        artifact_type: str | None = None,
    ) -> ArtifactRef:
        artifact = Artifact(
            type=artifact_type or step.artifact,
            task_id=state.task.id,
            step_id=step_id or step.id,
            calls=calls,
            parents=parents,
            body=body,
            cost_usd=cost_usd,
            created_ms=now_ms(),
        )
        return await self.artifacts.put(artifact)


class _Skipped(Exception):
    """An item of a for_each step not started because another item had failed."""


def verdict(output: str) -> str:
    """A review accepts when its first or last word is ACCEPT; anything else is a correction."""
    words = _VERDICT_WORD.findall(output)
    return "accept" if words and "ACCEPT" in {words[0].upper(), words[-1].upper()} else "revise"
