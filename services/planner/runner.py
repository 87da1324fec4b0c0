"""Runs one task: its workflow's steps as a DAG, each result stored as an artifact, every change announced.

A task publishes ``accepted``, ``planned``, ``step_started``/``step_done`` per step and then
exactly one terminal event: ``done`` (the final step's artifact), ``partial`` (a step could not
run but others produced artifacts: the best one so far), ``failed`` or ``killed``. Ready steps
run concurrently up to the fan-out cap; once a step fails, or the budget is spent, no new step
starts and the ones in flight finish (their artifacts count for ``partial``). The deadline
cancels whatever is still running, and the terminal event's detail says ``timeout``. Progress
events are published pipelined; their acknowledgements are awaited before the terminal event.

Defences, each a ``refused`` event with its reason just before the terminal event:

- Before any call: the pre-flight estimate must fit the task's budget and remaining time, and
  the task's fingerprint must have attempts left today (layer 2); otherwise the task ``failed``.
- Before each call: the call's worst-case cost must fit what is left of the budget (counting calls
  in flight), its model's typical latency must fit the time left, and the same call (role and
  messages) may not repeat more than ``limits.identical_calls`` times in the task (layer 2).
- After a call: a reservation the router could not get (error ``refused``) stops the task.

A step run once per task input (``for_each``) makes one call per distinct input, each holding one
of the task's fan-out slots, so a task never has more calls in flight than its fan-out cap; once
an item fails, no new item starts. A structured step's output is validated against its artifact
type; an invalid one is asked again with the error (a ``step_started`` event for that call, its
detail saying why), then escalated once to the step's ``escalate_to`` tier (an ``escalated``
event) before the step fails. Every call of a step is in its artifact's ``calls``.

A refusal never overruns: the task ends ``partial`` with the best artifact so far, or ``failed``
when there is none. A tripped kill switch (error ``killed``) ends it ``killed``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas.artifacts import (
    ARTIFACT_TYPES,
    ArtifactError,
    StructuredBody,
    is_structured,
    parse_structured,
    response_schema,
)
from schemas.messages import (
    TERMINAL_EVENTS,
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
from services.planner.antiloop import AttemptCounter
from services.planner.config import Limits
from services.planner.estimate import fits
from services.planner.preflight import Preflight, describe
from services.planner.workflow import GOAL, ITEM, StepSpec, Workflow, allowed_models, render
from services.routing.table import PinningError
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.reservations import HEADER_BUDGET

# A router that is briefly absent (restarting) is worth a retry, after this pause.
NO_RESPONDERS_PAUSE_S = 0.2
_VERDICT_WORD = re.compile(r"[A-Za-z]+")
# Why a step may stop that is a defence doing its job: announced as a ``refused`` event.
REFUSALS = frozenset({"refused", "budget", "deadline", "loop"})
# The artifact type of a for_each step's result: its items, in input order.
BATCH = "batch"
# What a model is told when its structured output did not validate, before it answers again.
INVALID_FEEDBACK = "That reply is invalid: {error}. Reply again with only the JSON object the schema asks for."


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
    # Worst cases of the calls in flight: spent plus these must stay within the budget.
    in_flight_usd: float = 0.0
    # How often each call (by role and messages) was sent.
    call_counts: Counter[str] = field(default_factory=Counter)
    # The task's inputs, fetched when a step runs once per input.
    inputs: list[Artifact] = field(default_factory=list)
    # One per model call in flight (a step's, or an item's of a for_each step): the fan-out cap.
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))


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
        self.subjects = bus.subjects
        self.workflows = workflows
        self.max_fanout = max_fanout
        self.limits = limits
        self.preflight = preflight
        self.attempts = attempts
        self.timeout_s = bus.settings.request_timeout_s
        self._js: JetStreamContext | None = None
        # Per task id: the acknowledgements of its progress events, awaited before its terminal event.
        self._unacked: dict[str, list[asyncio.Future[PubAck]]] = {}

    async def run(self, task: Task, schedule_run: str = "") -> TaskEventKind:
        """Run ``task`` to its terminal event and return that event's kind.

        ``schedule_run``: the ``Mesh-Schedule-Run`` header of a scheduled run (its own attempts count)."""
        try:
            return await self._run(task, schedule_run)
        finally:
            self.forget(task)

    async def _run(self, task: Task, schedule_run: str) -> TaskEventKind:
        workflow = self.workflows.get(task.workflow)
        await self._emit(task, "accepted")
        if workflow is None:
            known = ", ".join(sorted(self.workflows)) or "none"
            await self._emit(task, "failed", detail=f"unknown workflow {task.workflow!r}; known: {known}")
            return "failed"
        deadline_s = task.deadline_s if task.deadline_s is not None else self.timeout_s
        state = _TaskState(
            task,
            workflow,
            deadline_ms=(task.submitted_ms or now_ms()) + int(deadline_s * 1000),
            slots=asyncio.Semaphore(self._fanout(workflow)),
        )
        problem = await self._fetch_inputs(state)
        if problem is not None:
            await self._emit(task, "failed", detail=problem)
            return "failed"
        # The estimate first: it costs nothing, while a claim uses up one of the day's attempts.
        refusal = self._preflight(state) or await self.attempts.claim(task, schedule_run)
        if refusal is not None:
            await self._emit(task, "refused", detail=refusal)
            await self._emit(task, "failed", detail=refusal)
            return "failed"
        await self._emit(task, "planned", detail=",".join(s.id for s in workflow.steps))
        try:
            async with asyncio.timeout((state.deadline_ms - now_ms()) / 1000):
                stop = await self._run_steps(state)
        except TimeoutError:
            stop = StepFailed(f"timeout: the deadline of {deadline_s:g}s passed; work in flight was cancelled", "timeout")
        return await self._finish(state, stop)

    def _preflight(self, state: _TaskState) -> str | None:
        """Why the plan cannot fit the task's budget or remaining time, or None when it can."""
        task = state.task
        try:
            steps = self.preflight.steps(
                state.workflow,
                task.goal,
                task.allow_models,
                task.max_tokens,
                items=[_text(a) for a in _distinct(state.inputs)],
                fanout=self._fanout(state.workflow),
            )
        except PinningError as exc:
            return f"pre-flight estimate: {exc}"
        figures = Preflight.total(steps)
        reason = fits(figures, task.budget_usd, (state.deadline_ms - now_ms()) / 1000)
        if reason is None:
            return None
        return f"pre-flight estimate: {reason} (plan: {describe(figures)})"

    def _fanout(self, workflow: Workflow) -> int:
        return min(self.max_fanout, workflow.max_fanout or self.max_fanout)

    async def _fetch_inputs(self, state: _TaskState) -> str | None:
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
            state.inputs = list(await asyncio.gather(*(self._get(ref) for ref in task.inputs)))
        except StepFailed as exc:
            return f"a task input could not be read: {exc.reason}"
        return None

    async def _run_steps(self, state: _TaskState) -> StepFailed | None:
        """Run the DAG; return why it stopped early, or None when every step produced its artifact."""
        fanout = self._fanout(state.workflow)
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
        if stop.kind in REFUSALS:
            await self._emit(task, "refused", detail=stop.reason, state=state)
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
        elif step.for_each is not None:
            ref = await self._map_step(state, step, inputs)
        else:
            ref = await self._model_step(state, step, inputs)
        if ref not in state.produced:
            state.produced.append(ref)
        await self._emit(state.task, "step_done", step_id=step.id, artifact=ref, state=state)
        return ref

    async def _model_step(self, state: _TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        request = self._request(state, step, step.id, await self._values(state, inputs))
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

    async def _map_step(self, state: _TaskState, step: StepSpec, inputs: dict[str, Artifact]) -> ArtifactRef:
        """One call per distinct task input (an identical input gets the same artifact), at most the
        fan-out cap at once; the result is a ``batch`` of the items in the task's input order."""
        values = await self._values(state, inputs)
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
                    return await self._item(state, step, first_at[input_id], by_id[input_id], values)
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
        self, state: _TaskState, step: StepSpec, position: int, item: Artifact, values: dict[str, str]
    ) -> ArtifactRef:
        """The artifact of one input of a for_each step (the caller holds a fan-out slot)."""
        step_id = f"{step.id}[{position}]"
        request = self._request(state, step, step_id, {**values, ITEM: _text(item)})
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
        if ref not in state.produced:
            state.produced.append(ref)
        return ref

    def _request(self, state: _TaskState, step: StepSpec, step_id: str, values: dict[str, str]) -> StepRequest:
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

    async def _values(self, state: _TaskState, inputs: dict[str, Artifact]) -> dict[str, str]:
        """What the placeholders of a step's messages stand for: the goal and each need's text."""
        rendered = await asyncio.gather(*(self._render(artifact) for artifact in inputs.values()))
        return {GOAL: state.task.goal, **dict(zip(inputs, rendered, strict=True))}

    async def _render(self, artifact: Artifact) -> str:
        """An artifact as prompt text: its ``text``; a batch as each input with its output."""
        if artifact.type != BATCH:
            return _text(artifact)
        body = artifact.body
        ids = sorted(set(body["items"]) | set(body["inputs"]))
        bodies = await asyncio.gather(*(self._get(ArtifactRef(id=i, type="")) for i in ids))
        fetched = dict(zip(ids, bodies, strict=True))
        lines = []
        for n, (item_id, input_id) in enumerate(zip(body["items"], body["inputs"], strict=True), start=1):
            lines.append(f"{n}. {_text(fetched[input_id]).strip()}\n   => {_text(fetched[item_id])}")
        return "\n".join(lines)

    async def _produce(
        self, state: _TaskState, step: StepSpec, request: StepRequest, input_id: str
    ) -> tuple[dict, list[InferenceResult]]:
        """The body of a model step's artifact and every call it took (the caller holds a slot)."""
        results: list[InferenceResult] = []
        if is_structured(step.artifact):
            return await self._structured(state, step, request, results, input_id), results
        loops = min(step.max_loops, self.limits.max_loops) if step.retry_if is not None else 0
        for _ in range(loops + 1):
            result = await self._answer(state, request, results)
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
            "verdict": _verdict(result.output),
        }
        return {name: value for name, value in produced.items() if name in schema_fields}, results

    async def _structured(
        self, state: _TaskState, step: StepSpec, request: StepRequest, results: list[InferenceResult], input_id: str
    ) -> dict:
        """A body of the step's structured type, validated: the answer to ``request``; while it is
        invalid, asked again with the error (``invalid_retries`` times) on the same models; then
        once on the ``escalate_to`` tier. Raises StepFailed (kind ``invalid``) when none validates."""

        def parse(result: InferenceResult) -> dict:
            return parse_structured(step.artifact, result.output, input=input_id, model=result.model)

        result = await self._answer(state, request, results)
        try:
            return parse(result)
        except ArtifactError as exc:
            error = str(exc)
        retries = step.retries_when_invalid
        current = request
        for retry in range(1, retries + 1):
            await self._emit(
                state.task,
                "step_started",
                step_id=request.step_id,
                detail=f"retry {retry} of {retries} on {result.model}: the output is invalid: {error}",
                state=state,
            )
            # The same call again would get the same answer (temperature 0, and the router's cache):
            # the model is shown its reply and what is wrong with it.
            feedback = [
                ChatMessage(role="assistant", content=result.output),
                ChatMessage(role="user", content=INVALID_FEEDBACK.format(error=error)),
            ]
            current = msgspec.structs.replace(
                request, messages=[*request.messages, *feedback], attempt=current.attempt
            )
            result = await self._answer(state, current, results)
            try:
                return parse(result)
            except ArtifactError as exc:
                error = str(exc)
        invalid = f"the output of {result.model} is invalid after {retries} retries: {error}"
        tier = step.escalate_to
        if tier is None:
            raise StepFailed(invalid, kind="invalid")
        models = self._escalation_models(state, tier)
        if not models:
            raise StepFailed(f"{invalid}; no {tier} model is allowed to escalate to (allow_models)", kind="invalid")
        await self._emit(
            state.task,
            "escalated",
            step_id=request.step_id,
            detail=f"to tier {tier} ({', '.join(models)}): {invalid}",
            state=state,
        )
        # The original request, on the next tier: the stronger model starts afresh.
        escalated = msgspec.structs.replace(request, allow_models=models, attempt=current.attempt)
        result = await self._answer(state, escalated, results, loop_key=f"escalated to {tier}")
        try:
            return parse(result)
        except ArtifactError as exc:
            raise StepFailed(
                f"the output is invalid, escalated to tier {tier} too ({result.model}): {exc}", kind="invalid"
            ) from None

    def _escalation_models(self, state: _TaskState, tier: str) -> list[str]:
        """The models of ``tier`` the task allows (the router takes the cheapest)."""
        allow = state.task.allow_models
        return sorted(m.name for m in self.preflight.catalog.in_tier(tier) if allow is None or m.name in allow)

    async def _answer(
        self, state: _TaskState, request: StepRequest, results: list[InferenceResult], loop_key: str = ""
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
                result = await self._guarded_call(state, request, loop_key)
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

    async def _guarded_call(self, state: _TaskState, request: StepRequest, loop_key: str = "") -> InferenceResult:
        """``_call`` once the call passes the per-call defences (identical calls, budget, deadline)."""
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
        try:
            worst_usd, latency_s = self.preflight.call(request)
        except PinningError:
            # The router refuses it with the reason; nothing is spent.
            return await self._call(state, request)
        left_s = (state.deadline_ms - now_ms()) / 1000
        if latency_s > left_s:
            raise StepFailed(
                f"deadline would be exceeded: a call takes about {latency_s:g} s and {max(left_s, 0):.2f} s are left",
                kind="deadline",
            )
        budget = state.task.budget_usd
        if budget is not None and state.cost_usd + state.in_flight_usd + worst_usd > budget:
            raise StepFailed(
                f"budget would be exceeded: the call may cost ${worst_usd:.6f}, with ${state.cost_usd:.6f} spent "
                f"and ${state.in_flight_usd:.6f} in flight of ${budget:.6f}",
                kind="budget",
            )
        state.in_flight_usd += worst_usd
        try:
            return await self._call(state, request)
        finally:
            state.in_flight_usd -= worst_usd

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
        if task.budget_usd is not None:
            # The router reserves against the task's cap; a decimal string, never "1e-05".
            headers[HEADER_BUDGET] = format(Decimal(repr(task.budget_usd)), "f")
        # Counted when sent: a call the deadline cancels in flight is still metered by the services.
        state.calls += 1
        try:
            # nats-py directly, as Bus.request does: FastStream's request path costs more than the round trip.
            reply = await self.bus.broker.connection.request(
                self.subjects.step_request, encode(request), headers=headers, timeout=timeout_s
            )
        except NoRespondersError:
            state.calls -= 1  # no router got it: nothing was metered
            raise StepFailed("no router is answering step requests", kind="unavailable", retryable=True) from None
        except NatsTimeoutError:
            raise StepFailed("the router did not answer before the deadline", kind="timeout") from None
        try:
            return msgspec.json.decode(reply.data, type=InferenceResult)
        except msgspec.DecodeError:
            pass  # ValidationError is a DecodeError too: it may be a rejection, tried next
        # A rejection: the router refused the step before any inference call, so nothing was metered.
        state.calls -= 1
        try:
            error = msgspec.json.decode(reply.data, type=_Rejection).error
        except msgspec.DecodeError as exc:
            raise StepFailed(f"the router's reply is neither a result nor an error: {exc}", kind="invalid") from None
        raise StepFailed(f"router refused the step: {error.kind}: {error.message}", error.kind, error.retryable)

    # -- artifacts --

    async def _put(
        self,
        state: _TaskState,
        step: StepSpec,
        body: dict,
        parents: list[str],
        calls: list[str],
        cost_usd: float,
        *,
        step_id: str | None = None,
        artifact_type: str | None = None,
    ) -> ArtifactRef:
        artifact_type = artifact_type or step.artifact
        artifact = Artifact(
            type=artifact_type,
            task_id=state.task.id,
            step_id=step_id or step.id,
            calls=calls,
            parents=parents,
            body=body,
            cost_usd=cost_usd,
            created_ms=now_ms(),
        )
        reply = await self._artifact_request(self.subjects.artifact_put, artifact)
        if reply.ref is None:
            raise StepFailed(
                f"the artifact store refused the {artifact_type!r} artifact: {reply.error}", kind="invalid"
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
        subject, stream = self.subjects.task_event(task.id), self.subjects.stream(STREAM_TASK_EVENTS)
        if kind not in TERMINAL_EVENTS:
            # Pipelined: sent now (in order, on one connection), its acknowledgement awaited with the
            # terminal event's, so a task's progress costs no JetStream round trip per event.
            if self._js is None:
                self._js = self.bus.broker.connection.jetstream()
            ack = await self._js.publish_async(subject, encode(event), stream=stream)
            self._unacked.setdefault(task.id, []).append(ack)
            return
        # Every earlier event must be stored before the terminal one: the task's message is acked
        # after it, and a failure here makes the task crash, so JetStream redelivers it.
        unacked = self._unacked.pop(task.id, [])
        if unacked:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.gather(*unacked)
        await self.bus.broker.publish(encode(event), subject, stream=stream)

    def forget(self, task: Task) -> None:
        """Drop the acknowledgements still awaited for ``task``'s events (it ended without its terminal event)."""
        for ack in self._unacked.pop(task.id, []):
            if ack.done() and not ack.cancelled():
                ack.exception()  # retrieved: the task already failed for its own reason
            ack.cancel()


class _Skipped(Exception):
    """An item of a for_each step not started because another item had failed."""


def _distinct(artifacts: list[Artifact]) -> list[Artifact]:
    seen: dict[str, Artifact] = {}
    for artifact in artifacts:
        seen.setdefault(artifact.id, artifact)
    return list(seen.values())


def _text(artifact: Artifact) -> str:
    """An artifact's body as prompt text: its ``text`` field, else the JSON a model wrote (a
    structured body without the planner's provenance fields)."""
    body = artifact.body
    if isinstance(body.get("text"), str):
        return body["text"]
    schema = ARTIFACT_TYPES.get(artifact.type)
    hidden = schema.PROVENANCE if schema is not None and issubclass(schema, StructuredBody) else ()
    return msgspec.json.encode({k: v for k, v in body.items() if k not in hidden}).decode()


def _verdict(output: str) -> str:
    """A review accepts when its first or last word is ACCEPT; anything else is a correction."""
    words = _VERDICT_WORD.findall(output)
    return "accept" if words and "ACCEPT" in {words[0].upper(), words[-1].upper()} else "revise"
