"""What a model is shown: a step's messages with their placeholders filled from the goal and artifacts.

A placeholder stands for an artifact's text: its ``text`` field, or the JSON a model wrote for a
structured type (without the fields the planner adds for provenance, which the model never saw).
A ``batch`` (the result of a step run once per input) renders as each input with its output, so a
reduce step reads the whole map.
"""

from __future__ import annotations

import asyncio

import msgspec

from schemas.artifacts import ARTIFACT_TYPES, StructuredBody, is_structured, response_schema
from schemas.messages import Artifact, ChatMessage, StepRequest
from services.planner.clients import ArtifactClient
from services.planner.state import TaskState
from services.planner.workflow import BATCH, GOAL, StepSpec, allowed_models, render


def distinct(artifacts: list[Artifact]) -> list[Artifact]:
    """``artifacts`` without repeats (by id), first occurrences in order: one call per distinct input."""
    seen: dict[str, Artifact] = {}
    for artifact in artifacts:
        seen.setdefault(artifact.id, artifact)
    return list(seen.values())


def artifact_text(artifact: Artifact) -> str:
    """An artifact's body as prompt text: its ``text`` field, else the JSON a model wrote (a
    structured body without the planner's provenance fields)."""
    body = artifact.body
    if isinstance(body.get("text"), str):
        return body["text"]
    schema = ARTIFACT_TYPES.get(artifact.type)
    hidden = schema.PROVENANCE if schema is not None and issubclass(schema, StructuredBody) else ()
    return msgspec.json.encode({k: v for k, v in body.items() if k not in hidden}).decode()


async def placeholder_values(
    artifacts: ArtifactClient, state: TaskState, inputs: dict[str, Artifact]
) -> dict[str, str]:
    """What the placeholders of a step's messages stand for: the goal and each need's text."""
    rendered = await asyncio.gather(*(_render(artifacts, artifact) for artifact in inputs.values()))
    return {GOAL: state.task.goal, **dict(zip(inputs, rendered, strict=True))}


async def _render(artifacts: ArtifactClient, artifact: Artifact) -> str:
    """An artifact as prompt text: its ``text``; a batch as each input with its output."""
    if artifact.type != BATCH:
        return artifact_text(artifact)
    body = artifact.body
    ids = sorted(set(body["items"]) | set(body["inputs"]))
    bodies = await asyncio.gather(*(artifacts.get(i) for i in ids))
    fetched = dict(zip(ids, bodies, strict=True))
    lines = []
    for n, (item_id, input_id) in enumerate(zip(body["items"], body["inputs"], strict=True), start=1):
        lines.append(f"{n}. {artifact_text(fetched[input_id]).strip()}\n   => {artifact_text(fetched[item_id])}")
    return "\n".join(lines)


def step_request(state: TaskState, step: StepSpec, step_id: str, values: dict[str, str]) -> StepRequest:
    """The request of one call of ``step`` (``step_id`` names an item of a for_each step), not yet sent."""
    task = state.task
    return StepRequest(
        task_id=task.id,
        step_id=step_id,
        tenant=task.tenant,
        workflow=task.workflow,
        role=step.role,
        messages=[ChatMessage(role=m.role, content=render(m.content, values)) for m in step.messages],
        max_tokens=task.max_tokens or step.max_tokens,
        response_schema=response_schema(step.artifact) if is_structured(step.artifact) else None,
        # The step's own pin narrows the task's; the router never leaves it.
        allow_models=allowed_models(task.allow_models, step.allow_models),
        deadline_ms=state.deadline_ms,
        # Numbered from 1 by each call, retries and loops included.
        attempt=0,
    )
