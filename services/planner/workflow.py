"""Workflows are data: ``deploy/workflows/<name>.toml`` describes a DAG of steps.

A step is a model step (``kind = "model"``: one StepRequest to the router, its output stored as
an artifact of the step's type), a ``select`` step (no model call: it keeps the candidate its review
accepted, or takes the review's corrected answer) or an agent step (``kind = "agent"``: one
AgentRequest to the agent service ``agent`` on ``mesh.agent.<agent>``, with the step's ``params``,
the artifacts of its ``needs`` and its deadline; the agent stores the artifact itself and its own
model calls are calls of the task: docs/agents.md). Message templates may use ``{goal}`` (the task
goal) and ``{<step id>}`` (the ``text`` of that step's artifact, which must then be one of the
step's ``needs``).

An agent step waits ``timeout_s`` at most (never past the task's deadline); one the agent does not
answer in time, or answers with a retryable error, is sent again up to ``retries`` times (any live
instance may take it).

A model step may loop: with ``retry_if`` (a regular expression) it runs again, with the same
request, while its output matches, at most ``max_loops`` more times (the planner caps that at its
own ``limits.max_loops``). A loop that is still asking after that fails the step.

A model step may run once per task input (``for_each = "inputs"``, the map of a map-reduce): one
call per distinct input, in parallel under the task's fan-out cap, with ``{item}`` standing for
that input's text. Each call's output is an artifact of the step's type; the step's own result is
a ``batch`` artifact listing them in input order, and a later step's ``{<step id>}`` renders the
whole batch (each input with its output).

A step whose artifact type is structured (a model writes it as JSON: schemas/artifacts.py,
``StructuredBody``) is called with that type's JSON Schema as its response schema, and its output
is validated against the type before it is stored. An invalid output is asked again, with the
validation error, up to ``invalid_retries`` times (default 1) on the same model; then, with
``escalate_to = "<tier>"``, once on the cheapest model of that tier the task allows (an
``escalated`` event); then the step fails.

``allow_models`` pins a step: its calls run only on the models listed (and on those of the
task's own allow-list, when it has one: a step's list narrows the task's, never widens it). The
one exception is the workflow's own ``escalate_to`` tier, still inside the task's allow-list.

Everything is checked when the file is loaded, so a bad workflow stops the planner at start
with the file and the reason, never a task half-way through.
"""

from __future__ import annotations

import graphlib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from schemas.artifacts import ARTIFACT_TYPES, is_structured
from schemas.messages import ChatMessage, Tier
from schemas.subjects import token

GOAL = "goal"
# Replay backends find the recorded answer by the prompt, so the first user message of every
# model step must be the goal itself, untouched.
FIRST_USER_MESSAGE = "{goal}"
# In a step run once per task input: that input's text.
ITEM = "item"
# The artifact type of a for_each step's result: its items, in input order.
BATCH = "batch"
# What a step may run once per: the task's inputs (Task.inputs), in order.
ForEach = Literal["inputs"]
# An output that fails its schema is asked again this many times unless the step says otherwise.
DEFAULT_INVALID_RETRIES = 1
# An agent step is sent again at most this many times: each try may run the agent's whole loop.
MAX_AGENT_RETRIES = 5

_STEP_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")


class WorkflowError(ValueError):
    """A workflow file that cannot run; the message names the file and what is wrong."""


class StepSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One step of a workflow, as its file writes it (``[[steps]]``)."""

    id: str
    artifact: str
    kind: Literal["model", "select", "agent"] = "model"
    # Model steps: the role the router routes on, and the prompt.
    role: str = ""
    messages: list[ChatMessage] = []
    max_tokens: int = 512
    needs: list[str] = []
    # Model steps: run again while the output matches this regular expression, up to max_loops times.
    retry_if: str | None = None
    max_loops: int = 1
    # Model steps: one call per task input, ``{item}`` being that input's text.
    for_each: ForEach | None = None
    # Model steps: the models its calls may run on (None: any the task allows).
    allow_models: list[str] | None = None
    # Structured artifact types only: how often an invalid output is asked again (None: the default),
    # and the tier it then goes to once (None: the step fails instead).
    invalid_retries: int | None = None
    escalate_to: Tier | None = None
    # Agent steps: the agent service, its parameters (handed over as written), how often a try that
    # timed out or failed retryably is sent again, and how long one try may take (None: the task's deadline).
    agent: str = ""
    params: dict[str, Any] = {}
    retries: int | None = None
    timeout_s: float | None = None

    @property
    def retries_when_invalid(self) -> int:
        """How often an invalid structured output is asked again: the step's ``invalid_retries`` or the default."""
        return DEFAULT_INVALID_RETRIES if self.invalid_retries is None else self.invalid_retries


class Workflow(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A workflow file: its steps in order, the last one producing the task's answer."""

    name: str
    description: str = ""
    # A workflow may ask for less parallelism than the planner allows, never more.
    max_fanout: int | None = None
    steps: list[StepSpec]

    @property
    def final(self) -> StepSpec:
        """The step whose artifact is the task's answer: the last one listed."""
        return self.steps[-1]


def allowed_models(task_allow: list[str] | None, step_allow: list[str] | None) -> list[str] | None:
    """The models a step's call may run on: the task's list narrowed by the step's (None: any)."""
    if step_allow is None:
        return task_allow
    if task_allow is None:
        return list(step_allow)
    return [m for m in step_allow if m in task_allow]


def render(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders; other braces (JSON in a prompt, say) are left alone."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def parse_workflow(text: str, source: str = "<workflow>") -> Workflow:
    """Parse and validate one workflow document (TOML)."""
    try:
        workflow = msgspec.convert(tomllib.loads(text), type=Workflow)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise WorkflowError(f"{source}: {exc}") from None
    problems = _problems(workflow)
    if problems:
        raise WorkflowError(f"{source}: " + "; ".join(problems))
    return workflow


def load_workflow(path: Path) -> Workflow:
    """The workflow in ``path``, whose name must be the file's (tasks name workflows by file)."""
    workflow = parse_workflow(path.read_text(), str(path))
    if workflow.name != path.stem:
        raise WorkflowError(f"{path}: name {workflow.name!r} must match the file name {path.stem!r}")
    return workflow


def load_workflows(directory: Path) -> dict[str, Workflow]:
    """Every ``*.toml`` in ``directory`` by name; raises WorkflowError on the first bad file."""
    if not directory.is_dir():
        raise WorkflowError(f"no workflow directory at {directory}")
    return {path.stem: load_workflow(path) for path in sorted(directory.glob("*.toml"))}


def _problems(workflow: Workflow) -> list[str]:
    problems: list[str] = []
    if not workflow.steps:
        return ["a workflow needs at least one step"]
    if workflow.max_fanout is not None and workflow.max_fanout < 1:
        problems.append(f"max_fanout must be at least 1, not {workflow.max_fanout}")
    ids = [s.id for s in workflow.steps]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.append(f"duplicate step ids: {', '.join(duplicates)}")
    by_id = {s.id: s for s in workflow.steps}
    for step in workflow.steps:
        problems.extend(f"step {step.id!r}: {p}" for p in _step_problems(step, by_id))
    if problems:
        return problems
    try:
        graphlib.TopologicalSorter({s.id: s.needs for s in workflow.steps}).prepare()
    except graphlib.CycleError as exc:
        problems.append(f"steps form a cycle: {' -> '.join(exc.args[1])}")
    return problems


def _step_problems(step: StepSpec, by_id: dict[str, StepSpec]) -> list[str]:
    problems: list[str] = []
    if not _STEP_ID.match(step.id) or step.id in (GOAL, ITEM):
        problems.append(f"a step id must be letters, digits, '_' or '-' (and not {GOAL!r} or {ITEM!r})")
    if step.artifact not in ARTIFACT_TYPES:
        problems.append(f"unknown artifact type {step.artifact!r}; known: {', '.join(sorted(ARTIFACT_TYPES))}")
    unknown = [n for n in step.needs if n not in by_id]
    if unknown:
        problems.append(f"needs unknown steps: {', '.join(unknown)}")
    if step.id in step.needs:
        problems.append("needs itself")
    if step.artifact in ARTIFACT_TYPES and not is_structured(step.artifact):
        if step.invalid_retries is not None or step.escalate_to is not None:
            problems.append(
                f"invalid_retries and escalate_to need a structured artifact type (one a model writes as JSON), "
                f"not {step.artifact!r}"
            )
    if step.kind != "agent" and (step.agent or step.params or step.retries is not None or step.timeout_s is not None):
        problems.append("agent, params, retries and timeout_s are for agent steps (kind = \"agent\")")
    if step.kind == "model":
        problems.extend(_model_step_problems(step))
    elif step.kind == "agent":
        problems.extend(_agent_step_problems(step))
    else:
        if step.for_each is not None or step.allow_models is not None or step.escalate_to is not None:
            problems.append("a select step makes no model call: it takes no for_each, allow_models or escalate_to")
        if not unknown:
            problems.extend(_select_step_problems(step, by_id))
    return problems


def _agent_step_problems(step: StepSpec) -> list[str]:
    problems: list[str] = []
    try:
        token(step.agent)
    except ValueError:
        problems.append(f"agent must name the agent service (letters, digits, '-', '_'), not {step.agent!r}")
    if step.role or step.messages or step.retry_if is not None or step.escalate_to is not None:
        problems.append("an agent step sends no prompt of its own: it takes no role, messages, retry_if or escalate_to")
    if step.invalid_retries is not None:
        problems.append("an agent step takes no invalid_retries: an invalid artifact fails it")
    if step.retries is not None and not 0 <= step.retries <= MAX_AGENT_RETRIES:
        problems.append(f"retries must be 0 to {MAX_AGENT_RETRIES}, not {step.retries}")
    if step.timeout_s is not None and step.timeout_s <= 0:
        problems.append(f"timeout_s must be above 0, not {step.timeout_s}")
    if step.allow_models is not None and not step.allow_models:
        problems.append("allow_models must name at least one model (leave it out to allow any)")
    return problems


def _model_step_problems(step: StepSpec) -> list[str]:
    problems: list[str] = []
    if not step.role:
        problems.append("a model step needs a role")
    if step.max_tokens < 1:
        problems.append(f"max_tokens must be at least 1, not {step.max_tokens}")
    if step.retry_if is not None:
        try:
            re.compile(step.retry_if)
        except re.error as exc:
            problems.append(f"retry_if is not a regular expression: {exc}")
    if step.max_loops < 1:
        problems.append(f"max_loops must be at least 1, not {step.max_loops}")
    if step.invalid_retries is not None and step.invalid_retries < 0:
        problems.append(f"invalid_retries must not be negative, not {step.invalid_retries}")
    if step.allow_models is not None and not step.allow_models:
        problems.append("allow_models must name at least one model (leave it out to allow any)")
    if step.for_each is not None and step.retry_if is not None:
        problems.append("a step run for each input takes no retry_if")
    elif step.retry_if is not None and step.artifact in ARTIFACT_TYPES and is_structured(step.artifact):
        problems.append("a structured step takes no retry_if: an invalid output is retried by invalid_retries")
    user = [m.content for m in step.messages if m.role == "user"]
    if not user or user[0] != FIRST_USER_MESSAGE:
        problems.append(f"the first user message must be exactly {FIRST_USER_MESSAGE!r}")
    names = {name for message in step.messages for name in _PLACEHOLDER.findall(message.content)}
    for name in sorted(names):
        if name == ITEM and step.for_each is None:
            problems.append(f"placeholder {{{ITEM}}} needs for_each = \"inputs\"")
        elif name not in (GOAL, ITEM) and name not in step.needs:
            problems.append(f"placeholder {{{name}}} is neither {{goal}} nor one of its needs")
    if step.for_each is not None and ITEM not in names:
        problems.append(f"a step run for each input must use {{{ITEM}}} in its messages")
    return problems


def _select_step_problems(step: StepSpec, by_id: dict[str, StepSpec]) -> list[str]:
    if step.messages or step.role or step.retry_if is not None:
        return ["a select step makes no model call: it takes no role, messages or retry_if"]
    if len(step.needs) != 2:
        return ["a select step needs exactly [candidate, review]"]
    candidate, review = (by_id[n] for n in step.needs)
    problems = []
    if candidate.for_each is not None or review.for_each is not None:
        problems.append("it cannot select from a step run for each input (that produces a batch)")
    if review.artifact != "review":
        problems.append(f"its second need {review.id!r} must produce a 'review', not {review.artifact!r}")
    if candidate.artifact != step.artifact:
        problems.append(f"its first need {candidate.id!r} must produce its own type {step.artifact!r}")
    return problems
