"""An agent step: one ``AgentRequest`` to the agent service the step names, its artifact checked.

The agent gets the task's goal, the step's ``params``, the artifacts of its needs (and, run once per
task input, that input), what is left of the budget and the step's deadline: ``timeout_s`` from
now, never past the task's. It stores its artifacts itself; the step's result is the last one of
the step's type, read back from the store and checked against the type, so an agent cannot hand
over an artifact that does not exist or does not fit (``invalid``). Every valid artifact it
returned, on success or not, counts among the task's results, so a task it leaves half-done ends
``partial`` with the best of them.

The agent's own model calls went through the router as calls of this task (reserved against the
task's cap, metered with the agent's name); its account of them (``cost_usd``, ``calls``) moves the
task's running totals, which the next steps' budget checks read. A try that no instance answered,
that timed out or that failed retryably is sent again up to ``retries`` times (the queue group may
give it to another instance); a defence's refusal or a kill is never retried.

Before any of it, ``live_agents`` asks NATS's service framework for one live instance of each agent
the workflow names: a task that needs an agent nobody runs is refused at once, naming the agent,
rather than waiting out a step's time-out; the instances' figures price the pre-flight estimate.
"""

from __future__ import annotations

import asyncio

import msgspec

from schemas.artifacts import ArtifactError, validate_body
from schemas.messages import AgentRequest, AgentResult, ArtifactRef
from services.planner.clients import AgentClient, ArtifactClient
from services.planner.preflight import AgentFigures
from services.planner.state import StepFailed, TaskState
from services.planner.workflow import StepSpec, Workflow, allowed_models
from services.runtime.agents import live_agent
from services.runtime.bus import Bus, now_ms


async def live_agents(bus: Bus, workflow: Workflow) -> tuple[dict[str, AgentFigures | None], str | None]:
    """The figures of each agent ``workflow`` names (None: neither declared nor measured yet), or why
    the task cannot run: an agent with no live instance."""
    names = sorted({step.agent for step in workflow.steps if step.kind == "agent"})
    instances = await asyncio.gather(*(live_agent(bus, name) for name in names))
    missing = [name for name, instance in zip(names, instances, strict=True) if instance is None]
    if missing:
        listed = ", ".join(repr(name) for name in missing)
        return {}, (
            f"pre-flight: agent {listed} has no live instance on this mesh; start one "
            "(`frugalmesh agent run <module>:<attribute>`; `frugalmesh agents` lists the live ones)"
        )
    return {name: i.figures() for name, i in zip(names, instances, strict=True) if i is not None}, None


class AgentSteps:
    """Runs agent steps (the caller holds a fan-out slot for each request in flight)."""

    def __init__(self, agents: AgentClient, artifacts: ArtifactClient) -> None:
        self.agents = agents
        self.artifacts = artifacts

    async def run(
        self, state: TaskState, step: StepSpec, step_id: str, item: ArtifactRef | None = None
    ) -> ArtifactRef:
        """The artifact the agent produced for ``step`` (``item``: the task input of one for_each request)."""
        tries = 1 + (step.retries or 0)
        for attempt in range(1, tries + 1):
            request = self._request(state, step, step_id, item, attempt)
            try:
                result = await self.agents.call(state, request)
            except StepFailed as exc:
                if exc.retryable and attempt < tries:
                    continue
                raise
            state.cost_usd += result.cost_usd
            state.calls += len(result.calls)
            kept, problems = await self._checked(result)
            for ref in kept:
                state.keep(ref)
            if result.error is None:
                wanted = [ref for ref in kept if ref.type == step.artifact]
                if wanted:
                    return wanted[-1]
                why = "; ".join(problems) or f"it returned {len(kept)} artifacts, none of them {step.artifact!r}"
                raise StepFailed(f"agent {step.agent!r} produced no valid {step.artifact!r} artifact: {why}", "invalid")
            error = result.error
            if not (error.retryable and attempt < tries):
                raise StepFailed(f"agent {step.agent!r}: {error.kind}: {error.message}", error.kind, error.retryable)
        raise AssertionError("unreachable: the last try returns or raises")

    def _request(
        self, state: TaskState, step: StepSpec, step_id: str, item: ArtifactRef | None, attempt: int
    ) -> AgentRequest:
        task = state.task
        deadline_ms = state.deadline_ms
        if step.timeout_s is not None:
            deadline_ms = min(deadline_ms, now_ms() + int(step.timeout_s * 1000))
        budget_left = None
        if task.budget_usd is not None:
            budget_left = max(0.0, task.budget_usd - state.cost_usd - state.in_flight_usd)
        return AgentRequest(
            task_id=task.id,
            step_id=step_id,
            tenant=task.tenant,
            workflow=task.workflow,
            agent=step.agent,
            goal=task.goal,
            inputs=[item] if item is not None else list(task.inputs),
            needs={need: state.refs[need] for need in step.needs},
            params=step.params,
            artifact=step.artifact,
            budget_left_usd=budget_left,
            task_budget_usd=task.budget_usd,
            deadline_ms=deadline_ms,
            allow_models=allowed_models(task.allow_models, step.allow_models),
            attempt=attempt,
        )

    async def _checked(self, result: AgentResult) -> tuple[list[ArtifactRef], list[str]]:
        """The artifacts of ``result`` that exist and are valid for their type, and what is wrong with the others."""
        kept: list[ArtifactRef] = []
        problems: list[str] = []
        for ref in result.artifacts:
            try:
                artifact = await self.artifacts.get(ref.id)
                if artifact.type != ref.type:
                    raise ArtifactError(f"it is a {artifact.type!r} artifact, not the {ref.type!r} it was said to be")
                validate_body(artifact.type, artifact.schema_version, artifact.body)
            except StepFailed as exc:
                problems.append(f"{ref.id[:12]}: {exc.reason}")
            except (ArtifactError, msgspec.ValidationError) as exc:
                problems.append(f"{ref.id[:12]}: {exc}")
            else:
                kept.append(ref)
        return kept, problems
