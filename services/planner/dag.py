"""Runs one task: its workflow's steps as a DAG, each result stored as an artifact, every change announced.

A task publishes ``accepted``, ``planned``, ``step_started``/``step_done`` per step and then
exactly one terminal event (services/planner/events.py): ``done`` (the final step's artifact),
``partial`` (a step could not run but others produced artifacts: the best one so far), ``failed``
or ``killed``. Ready steps run concurrently up to the fan-out cap; once a step fails, or the budget
is spent, no new step starts and the ones in flight finish (their artifacts count for
``partial``). The deadline cancels whatever is still running, and the terminal event's detail
says ``timeout``.

Before any call every agent the workflow names must have a live instance, and the task must pass the
pre-flight estimate and have attempts left today; a defence
that stops it (services/planner/guards.py, antiloop.py) is a ``refused`` event with its reason just
before the terminal event. A refusal never overruns: the task ends ``partial`` with the best
artifact so far, or ``failed`` when there is none. A reservation the router could not get (error
``refused``) stops the task too; a tripped kill switch (error ``killed``) ends it ``killed``.
"""

from __future__ import annotations

import asyncio

from schemas.messages import ArtifactRef, Task, TaskEventKind
from services.planner.agent_steps import AgentSteps, live_agents
from services.planner.antiloop import AttemptCounter
from services.planner.clients import AgentClient, ArtifactClient, RouterClient, artifacts_of
from services.planner.config import Limits
from services.planner.events import EventPublisher
from services.planner.guards import CallGuard, over_budget, preflight_refusal
from services.planner.preflight import Preflight
from services.planner.state import REFUSALS, EarlierRuns, RunTotals, StepFailed, TaskState
from services.planner.steps import StepRunner
from services.planner.structured import StructuredOutput
from services.planner.workflow import StepSpec, Workflow
from services.runtime.bus import Bus, now_ms


class Planner:
    """Runs tasks on a connected bus. ``run`` returns once the task's terminal event is published."""

    def __init__(
        self,
        bus: Bus,
        workflows: dict[str, Workflow],
        max_fanout: int,
        limits: Limits,
        preflight: Preflight,
        attempts: AttemptCounter,
    ) -> None:
        if max_fanout < 1:
            raise ValueError(f"max_fanout must be at least 1, not {max_fanout}")
        self.bus = bus
        self.workflows = workflows
        self.max_fanout = max_fanout
        self.preflight = preflight
        self.attempts = attempts
        self.timeout_s = bus.settings.request_timeout_s
        self.artifacts = ArtifactClient(bus, self.timeout_s)
        self.events = EventPublisher(bus)
        calls = CallGuard(RouterClient(bus), preflight, limits)
        structured = StructuredOutput(calls, self.events, preflight.catalog)
        agents = AgentSteps(AgentClient(bus), self.artifacts)
        self.steps = StepRunner(calls, structured, self.artifacts, self.events, limits, agents)
        self.earlier_runs = EarlierRuns()

    async def run(self, task: Task, schedule_run: str = "") -> TaskEventKind:
        """Run ``task`` to its terminal event and return that event's kind.

        ``schedule_run``: the ``Mesh-Schedule-Run`` header of a scheduled run (its own attempts count).
        Every artifact the run puts or gets is its tenant's. A run that raises leaves what the task has
        sent and spent so far in ``earlier_runs``, for its next delivery (services/planner/app.py)."""
        earlier = self.earlier_runs.take(task)
        started: list[TaskState] = []  # this run's state, once it has one
        try:
            with artifacts_of(task.tenant):
                return await self._run(task, schedule_run, earlier, started)
        except Exception:
            self.earlier_runs.keep(task, started[0].totals() if started else earlier)
            raise
        finally:
            self.events.forget(task)

    async def _run(
        self, task: Task, schedule_run: str, earlier: RunTotals, started: list[TaskState]
    ) -> TaskEventKind:
        emit = self.events.emit
        workflow = self.workflows.get(task.workflow)
        await emit(task, "accepted", totals=earlier)
        if workflow is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            await emit(task, "failed", detail=f"unknown workflow {task.workflow!r}; known: {known}", totals=earlier)
            return "failed"
        deadline_s = task.deadline_s if task.deadline_s is not None else self.timeout_s
        state = TaskState(
            task,
            workflow,
            deadline_ms=(task.submitted_ms or now_ms()) + int(deadline_s * 1000),
            slots=asyncio.Semaphore(self.fanout(workflow)),
            earlier=earlier,
        )
        started.append(state)
        problem = await self._fetch_inputs(state)
        if problem is not None:
            await emit(task, "failed", detail=problem, totals=state.totals())
            return "failed"
        # The agents and the estimate first: they cost nothing, while a claim uses up one of the day's attempts.
        agents, refusal = await live_agents(self.bus, workflow)
        if refusal is None:
            refusal = preflight_refusal(self.preflight, state, self.fanout(workflow), agents)
        if refusal is None:
            refusal = await self.attempts.claim(task, schedule_run)
        if refusal is not None:
            await emit(task, "refused", detail=refusal, totals=state.totals())
            await emit(task, "failed", detail=refusal, totals=state.totals())
            return "failed"
        await emit(task, "planned", detail=",".join(s.id for s in workflow.steps), totals=state.totals())
        try:
            async with asyncio.timeout(state.left_s()):
                stop = await self._run_steps(state)
        except TimeoutError:
            reason = f"timeout: the deadline of {deadline_s:g}s passed; work in flight was cancelled"
            stop = StepFailed(reason, "timeout")
        return await self._finish(state, stop)

    def fanout(self, workflow: Workflow) -> int:
        """How many calls of a task of ``workflow`` may be in flight: the planner's cap, or the workflow's if lower."""
        return min(self.max_fanout, workflow.max_fanout or self.max_fanout)

    async def _fetch_inputs(self, state: TaskState) -> str | None:
        """Fetch the task's inputs when a step runs once per input; why the task cannot run, or None."""
        steps = [s.id for s in state.workflow.steps if s.for_each == "inputs"]
        if not steps:
            return None
        task = state.task
        if not task.inputs:
            return (
                f"workflow {task.workflow!r} runs step {steps[0]!r} once per task input, and the task has no inputs "
                "(Task.inputs: one artifact per item)"
            )
        try:
            state.inputs = list(await asyncio.gather(*(self.artifacts.get(ref.id) for ref in task.inputs)))
        except StepFailed as exc:
            return f"a task input could not be read: {exc.reason}"
        return None

    async def _run_steps(self, state: TaskState) -> StepFailed | None:
        """Run the DAG; return why it stopped early, or None when every step produced its artifact."""
        fanout = self.fanout(state.workflow)
        waiting = list(state.workflow.steps)
        running: dict[asyncio.Task[ArtifactRef], StepSpec] = {}
        stop: StepFailed | None = None
        try:
            while True:
                if stop is None:
                    stop = over_budget(state)
                if stop is None:
                    ready = [s for s in waiting if all(n in state.refs for n in s.needs)]
                    for step in ready[: fanout - len(running)]:
                        waiting.remove(step)
                        running[asyncio.create_task(self.steps.run(state, step))] = step
                if not running:
                    return stop
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for done in finished:
                    step = running.pop(done)
                    try:
                        state.refs[step.id] = done.result()
                    except StepFailed as exc:
                        # Keep the first reason: later failures are usually its consequence.
                        stop = stop or StepFailed(f"step {step.id!r}: {exc.reason}", exc.kind)
        finally:
            for pending in running:
                pending.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _finish(self, state: TaskState, stop: StepFailed | None) -> TaskEventKind:
        task, emit = state.task, self.events.emit
        # The agent whose step makes the answer, so task rows can be summed per agent.
        agent = state.workflow.final.agent
        if stop is None:
            await emit(task, "done", artifact=state.refs[state.workflow.final.id], totals=state.totals(), agent=agent)
            return "done"
        if stop.kind in REFUSALS:
            await emit(task, "refused", detail=stop.reason, totals=state.totals())
        kind: TaskEventKind = "killed" if stop.kind == "killed" else "partial" if state.produced else "failed"
        await emit(task, kind, detail=stop.reason, artifact=best(state), totals=state.totals(), agent=agent)
        return kind


def best(state: TaskState) -> ArtifactRef | None:
    """A stopped task's result: the latest artifact of the final step's type, else the latest of any type."""
    if not state.produced:
        return None
    wanted = state.workflow.final.artifact
    return next((r for r in reversed(state.produced) if r.type == wanted), state.produced[-1])
