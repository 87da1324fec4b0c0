"""Runs one task: its workflow's steps as a DAG, each result stored as an artifact, every change announced.

A task publishes ``accepted``, ``planned``, ``step_started``/``step_done`` per step and then
exactly one terminal event: ``done`` (the final step's artifact), ``partial`` (a step could not
run but others produced artifacts: the best one so far), ``failed`` or ``killed``. Ready steps
run concurrently up to the fan-out cap; once a step fails, or the budget is spent, no new step
starts and the ones in flight finish (their artifacts count for ``partial``). The deadline
cancels whatever is still running.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas.artifacts import ARTIFACT_TYPES
from schemas.messages import (
    Artifact,
    ArtifactGet,
    ArtifactRef,
    ArtifactReply,
    ChatMessage,
    ErrorInfo,
    InferenceResult,
    StepRequest,
    Task,
    TaskEvent,
    TaskEventKind,
)
from schemas.subjects import HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT, STREAM_TASK_EVENTS
from services.planner.workflow import GOAL, StepSpec, Workflow, render
from services.runtime.bus import Bus, encode, now_ms

# A step whose call failed with a retryable error gets exactly one more attempt.
MAX_ATTEMPTS = 2
# A router that is briefly absent (restarting) is worth that retry, after this pause.
NO_RESPONDERS_PAUSE_S = 0.2
_VERDICT_WORD = re.compile(r"[A-Za-z]+")


class StepFailed(Exception):
    """Why a step produced no artifact; ``kind`` is an ErrorKind (or ``budget``), ``retryable`` allows one more try."""

    def __init__(self, reason: str, kind: str = "error", retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.retryable = retryable


class _Rejection(msgspec.Struct):
    """What a service replies to a request it could not accept (``Bus.rejection``)."""

    error: ErrorInfo


@dataclass
class _TaskState:
    task: Task
    workflow: Workflow
    deadline_ms: int
    refs: dict[str, ArtifactRef] = field(default_factory=dict)
    produced: list[ArtifactRef] = field(default_factory=list)
    cost_usd: float = 0.0
    calls: int = 0


class Planner:
    """Runs tasks on a connected bus. ``run`` returns once the task's terminal event is published."""

    def __init__(self, bus: Bus, workflows: dict[str, Workflow], max_fanout: int) -> None:
        if max_fanout < 1:
            raise ValueError(f"max_fanout must be at least 1, not {max_fanout}")
        self.bus = bus
        self.subjects = bus.subjects
        self.workflows = workflows
        self.max_fanout = max_fanout
        self.timeout_s = bus.settings.request_timeout_s

    async def run(self, task: Task) -> TaskEventKind:
        """Run ``task`` to its terminal event and return that event's kind."""
        workflow = self.workflows.get(task.workflow)
        await self._emit(task, "accepted")
        if workflow is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            await self._emit(task, "failed", detail=f"unknown workflow {task.workflow!r}; known: {known}")
            return "failed"
        deadline_s = task.deadline_s if task.deadline_s is not None else self.timeout_s
        state = _TaskState(task, workflow, deadline_ms=(task.submitted_ms or now_ms()) + int(deadline_s * 1000))
        await self._emit(task, "planned", detail=",".join(s.id for s in workflow.steps))
        try:
            async with asyncio.timeout((state.deadline_ms - now_ms()) / 1000):
                stop = await self._run_steps(state)
        except TimeoutError:
            stop = StepFailed(f"deadline of {deadline_s:g}s exceeded", kind="timeout")
        return await self._finish(state, stop)

    async def _run_steps(self, state: _TaskState) -> StepFailed | None:
        """Run the DAG; return why it stopped early, or None when every step produced its artifact."""
        fanout = min(self.max_fanout, state.workflow.max_fanout or self.max_fanout)
        waiting = list(state.workflow.steps)
        running: dict[asyncio.Task[ArtifactRef], StepSpec] = {}
        stop: StepFailed | None = None
        try:
            while True:
                if stop is None:
                    stop = self._over_budget(state)
                if stop is None:
                    ready = [s for s in waiting if all(n in state.refs for n in s.needs)]
                    for step in ready[: fanout - len(running)]:
                        waiting.remove(step)
                        running[asyncio.create_task(self._run_step(state, step))] = step
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

    def _over_budget(self, state: _TaskState) -> StepFailed | None:
        budget = state.task.budget_usd
        if budget is not None and state.cost_usd >= budget:
            return StepFailed(f"budget spent: ${state.cost_usd:.6f} of ${budget:.6f}", kind="budget")
        return None

    async def _finish(self, state: _TaskState, stop: StepFailed | None) -> TaskEventKind:
        task = state.task
        if stop is None:
            await self._emit(task, "done", artifact=state.refs[state.workflow.final.id], state=state)
            return "done"
        kind: TaskEventKind = "killed" if stop.kind == "killed" else "partial" if state.produced else "failed"
        await self._emit(task, kind, detail=stop.reason, artifact=self._best(state), state=state)
        return kind

    @staticmethod
    def _best(state: _TaskState) -> ArtifactRef | None:
        """The latest artifact of the final step's type, else the latest of any type."""
        if not state.produced:
            return None
        wanted = state.workflow.final.artifact
        return next((r for r in reversed(state.produced) if r.type == wanted), state.produced[-1])

    # -- steps --

    async def _run_step(self, state: _TaskState, step: StepSpec) -> ArtifactRef:
        await self._emit(state.task, "step_started", step_id=step.id, state=state)
        inputs = {need: await self._get(state.refs[need]) for need in step.needs}
        if step.kind == "select":
            ref = await self._select(state, step, inputs)
        else:
            ref = await self._model_step(state, step, inputs)
        if ref not in state.produced:
            state.produced.append(ref)
        await self._emit(state.task, "step_done", step_id=step.id, artifact=ref, state=state)
        return ref

    async def _model_step(self, state: _TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        task = state.task
        values = {GOAL: task.goal, **{need: artifact.body["text"] for need, artifact in inputs.items()}}
        request = StepRequest(
            task_id=task.id,
            step_id=step.id,
            tenant=task.tenant,
            workflow=task.workflow,
            role=step.role,
            messages=[ChatMessage(role=m.role, content=render(m.content, values)) for m in step.messages],
            max_tokens=step.max_tokens,
            allow_models=task.allow_models,
            deadline_ms=state.deadline_ms,
        )
        calls: list[str] = []
        cost = 0.0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            request.attempt = attempt
            try:
                result = await self._call(state, request)
            except StepFailed as exc:
                if not (exc.retryable and attempt < MAX_ATTEMPTS):
                    raise
                await asyncio.sleep(NO_RESPONDERS_PAUSE_S)
                continue
            calls.append(result.call_id)
            cost += result.cost_usd
            state.calls += 1
            state.cost_usd += result.cost_usd
            if result.error is None:
                break
            if not (result.error.retryable and attempt < MAX_ATTEMPTS):
                raise StepFailed(f"{result.error.kind}: {result.error.message}", result.error.kind)
        schema_fields = ARTIFACT_TYPES[step.artifact].__struct_fields__
        produced = {
            "text": result.output,
            "model": result.model,
            "graded": result.graded,
            "verdict": _verdict(result.output),
        }
        body = {name: value for name, value in produced.items() if name in schema_fields}
        return await self._put(state, step, body, parents=[a.id for a in inputs.values()], calls=calls, cost_usd=cost)

    async def _select(self, state: _TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        candidate, review = (inputs[need] for need in step.needs)
        if review.body["verdict"] == "accept":
            return state.refs[step.needs[0]]
        # The review rejected the candidate and wrote the corrected answer: that is the result.
        schema_fields = ARTIFACT_TYPES[step.artifact].__struct_fields__
        body = {name: value for name, value in review.body.items() if name in schema_fields}
        return await self._put(state, step, body, parents=[candidate.id, review.id], calls=[], cost_usd=0.0)

    async def _call(self, state: _TaskState, request: StepRequest) -> InferenceResult:
        """One StepRequest to the router. A result carrying an error is returned (the caller may retry);
        no reply, or a rejection instead of a result, raises StepFailed."""
        task = state.task
        timeout_s = (state.deadline_ms - now_ms()) / 1000
        if timeout_s <= 0:
            raise StepFailed("deadline exceeded before the call", kind="timeout")
        headers = {HEADER_DEADLINE: str(state.deadline_ms), HEADER_TASK: task.id, HEADER_TENANT: task.tenant}
        try:
            reply = await self.bus.broker.request(
                encode(request), self.subjects.step_request, headers=headers, timeout=timeout_s
            )
        except NoRespondersError:
            raise StepFailed("no router is answering step requests", kind="unavailable", retryable=True) from None
        except NatsTimeoutError:
            raise StepFailed("the router did not answer before the deadline", kind="timeout") from None
        try:
            return msgspec.json.decode(reply.body, type=InferenceResult)
        except msgspec.DecodeError:
            pass  # ValidationError is a DecodeError too: it may be a rejection, tried next
        try:
            error = msgspec.json.decode(reply.body, type=_Rejection).error
        except msgspec.DecodeError as exc:
            raise StepFailed(f"the router's reply is neither a result nor an error: {exc}", kind="invalid") from None
        raise StepFailed(f"router refused the step: {error.kind}: {error.message}", error.kind, error.retryable)

    # -- artifacts --

    async def _put(
        self, state: _TaskState, step: StepSpec, body: dict, parents: list[str], calls: list[str], cost_usd: float
    ) -> ArtifactRef:
        artifact = Artifact(
            type=step.artifact,
            task_id=state.task.id,
            step_id=step.id,
            calls=calls,
            parents=parents,
            body=body,
            cost_usd=cost_usd,
            created_ms=now_ms(),
        )
        reply = await self._artifact_request(self.subjects.artifact_put, artifact)
        if reply.ref is None:
            raise StepFailed(
                f"the artifact store refused the {step.artifact!r} artifact: {reply.error}", kind="invalid"
            )
        return reply.ref

    async def _get(self, ref: ArtifactRef) -> Artifact:
        reply = await self._artifact_request(self.subjects.artifact_get, ArtifactGet(id=ref.id))
        if reply.artifact is None:
            raise StepFailed(f"artifact {ref.id} could not be read: {reply.error}", kind="unavailable")
        return reply.artifact

    async def _artifact_request(self, subject: str, message: msgspec.Struct) -> ArtifactReply:
        try:
            return await self.bus.request(subject, message, ArtifactReply, self.timeout_s)
        except (NoRespondersError, NatsTimeoutError):
            raise StepFailed("the artifact store is not answering", kind="unavailable") from None
        except msgspec.DecodeError as exc:
            raise StepFailed(f"the artifact store's reply is not an ArtifactReply: {exc}", kind="invalid") from None

    # -- events --

    async def _emit(
        self,
        task: Task,
        kind: TaskEventKind,
        *,
        step_id: str | None = None,
        detail: str = "",
        artifact: ArtifactRef | None = None,
        state: _TaskState | None = None,
    ) -> None:
        event = TaskEvent(
            task_id=task.id,
            kind=kind,
            time_ms=now_ms(),
            tenant=task.tenant,
            workflow=task.workflow,
            step_id=step_id,
            detail=detail,
            artifact=artifact,
            cost_usd=state.cost_usd if state else 0.0,
            calls=state.calls if state else 0,
        )
        await self.bus.broker.publish(
            encode(event), self.subjects.task_event(task.id), stream=self.subjects.stream(STREAM_TASK_EVENTS)
        )


def _verdict(output: str) -> str:
    """A review accepts when its first or last word is ACCEPT; anything else is a correction."""
    words = _VERDICT_WORD.findall(output)
    return "accept" if words and "ACCEPT" in {words[0].upper(), words[-1].upper()} else "revise"
