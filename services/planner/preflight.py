"""The numbers behind the pre-flight estimate: which model each step of a workflow would run on, and
what one call of it costs, takes and achieves. ``estimate.py`` turns them into the plan's figures.

- Model: the one the router's table would pick (``deploy/routing.toml``: the rule's tier, then the
  cheapest model of it the task's allow-list permits), so the estimate prices what will run.
- Cost: the price table's worst case (``deploy/models.toml``): the step's prompt, counted with the
  model's tokenizer, plus ``max_tokens`` of output. A ``{need}`` placeholder stands for an upstream
  output not yet written, so it counts as that step's ``max_tokens``. The router reserves the same
  worst case before the call, so a plan that fits here is not refused there for its size alone.
- Latency: ``latency_s`` of the model in ``deploy/planner.toml`` (a documented assumption).
- Success: the model's recorded accuracy in the routing data (``p_success`` in planner.toml only
  for a model without recorded outcomes), lifted by the planner's retries per step. A model with
  neither (the data is not here, a new model) makes the plan's reliability unknown (NaN): cost and
  latency, which are what the planner refuses on, are still known.

An agent step is priced with the agent's own figures for one request (cost, latency, success):
declared in its registration, else measured by its instances (services/runtime/agents.py), its
retries lifting its success like a model step's. An agent with neither is priced at $0 and no
time, and makes the plan's reliability unknown: each of its calls is still reserved against the
task's budget before it runs. A select step makes no call: $0, no time, always succeeds. Cache hits
are not foreseen (the plan is priced as if every call were paid), and a looping step (``retry_if``)
is priced once, like a retry.

A step run once per task input (``for_each``) is N calls, one per distinct input: its cost is
the sum of their worst cases (each prompt with its own input), its latency ``ceil(N / fanout)``
calls one after another (the fan-out cap runs them in waves), its success every item's. Its output,
as a later step's placeholder sees it, is every input plus ``max_tokens`` per item. A retry or an
escalation after an invalid structured output is, like any retry, not priced.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import msgspec

from schemas.messages import ChatMessage, StepRequest
from services.planner.config import PlannerConfig
from services.planner.estimate import CallProfile, PlanEstimate, Step, estimate, plan_from_dag
from services.planner.workflow import GOAL, ITEM, StepSpec, Workflow, allowed_models, render
from services.routing.table import RoutingTable, pick_model, prompt_chars
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.data import DataNotFound, load_recorded_outcomes, resolve_data_dir
from services.runtime.tokens import count_message_tokens

# An upstream output not yet written counts as its max_tokens; the table's size rules measure
# characters, about 4 to a token in English (4.25 on the recorded prompts, in GPT-4's tokenizer).
CHARS_PER_TOKEN = 4
FREE = CallProfile(cost_usd=0.0, latency_s=0.0, p_success=1.0)
# One agent request's cost (USD), latency (s) and success share (services/runtime/agents.py AgentInstance.figures).
AgentFigures = tuple[float, float, float]


@cache
def recorded_accuracy(data_dir: Path) -> dict[str, float]:
    """Share of recorded prompts each model (by its data column) answered correctly."""
    correct: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for record in load_recorded_outcomes(data_dir):
        for column, ok in record.correct.items():
            seen[column] += 1
            correct[column] += ok
    return {column: correct[column] / seen[column] for column in seen}


@dataclass(frozen=True)
class StepEstimate:
    """One workflow step as the estimate sees it; ``model`` is None for a step that makes no call."""

    step_id: str
    needs: tuple[str, ...]
    model: ModelSpec | None
    input_tokens: int
    max_tokens: int
    step: Step
    # False when the model's success probability is unknown: ``step.reliability`` then means nothing.
    p_known: bool = True
    # Model calls the step makes (a for_each step: one per distinct input); input_tokens and
    # max_tokens are their totals.
    calls: int = 1


class Preflight:
    """Prices a workflow for a task before it runs, and each call before it is sent, as the router will route them.

    The planner refuses a task whose plan cannot fit its budget or deadline, and a call whose worst
    case no longer fits; both need the model the router would pick, so this holds the same routing
    table and catalogue as the router, plus each model's typical latency and success rate.
    """

    def __init__(
        self, catalog: Catalog, table: RoutingTable, profiles: dict[str, tuple[float, float | None]], retries: int
    ) -> None:
        # profiles: model name -> (latency_s, p_success or None when unknown)
        self.catalog = catalog
        self.table = table
        self.profiles = profiles
        self.retries = retries

    @classmethod
    def load(cls, deploy_dir: Path, data: Path | None, config: PlannerConfig) -> Preflight:
        """Profiles for every catalogued model; ValueError for a model planner.toml gives no latency."""
        catalog = Catalog.load(deploy_dir)
        catalog.load_tokenizers()
        try:
            accuracy = recorded_accuracy(resolve_data_dir(data))
        except DataNotFound:
            accuracy = {}
        profiles = {}
        for model in catalog.models.values():
            profile = config.models.get(model.name)
            if profile is None:
                raise ValueError(f"{deploy_dir / 'planner.toml'}: no [models.{model.name}] latency_s for the estimate")
            p_success = profile.p_success if profile.p_success is not None else accuracy.get(model.recorded_as or "")
            profiles[model.name] = (profile.latency_s, p_success)
        return cls(catalog, RoutingTable.load(deploy_dir), profiles, config.limits.step_attempts - 1)

    def check(self, workflows: Mapping[str, Workflow]) -> list[str]:
        """Steps that name a model or tier this catalogue does not have. Not fatal: a catalogue may
        be a subset (a load test's), and such a step's tasks are refused by the pre-flight, with the
        reason, before any call; the planner logs these at start."""
        problems = []
        for workflow in workflows.values():
            for spec in workflow.steps:
                unknown = [m for m in spec.allow_models or [] if m not in self.catalog.models]
                if unknown:
                    problems.append(
                        f"workflow {workflow.name!r}, step {spec.id!r}: allow_models names models not in the "
                        f"catalogue: {unknown}"
                    )
                if spec.escalate_to is not None and not self.catalog.in_tier(spec.escalate_to):
                    problems.append(
                        f"workflow {workflow.name!r}, step {spec.id!r}: escalate_to {spec.escalate_to!r}: "
                        "the catalogue has no model of that tier"
                    )
        return problems

    def steps(
        self,
        workflow: Workflow,
        goal: str,
        allow_models: list[str] | None,
        max_tokens: int | None,
        *,
        items: Sequence[str] = (),
        fanout: int = 9,
        agents: Mapping[str, AgentFigures | None] | None = None,
        priced: bool = True,
    ) -> list[StepEstimate]:
        """Each step priced; raises PinningError when the allow-list permits no model for a step.
        ``priced`` False: the prompts' tokens are not counted, so costs are output-only (for a task
        with no budget, where no decision reads the cost: see ``call``).

        ``items``: the texts of the task's distinct inputs, which a for_each step runs once each;
        ``fanout``: how many of those calls run at once; ``agents``: each agent's figures for one
        request (cost USD, latency s, success share), None when it has none."""
        out_tokens: dict[str, int] = {}
        estimates = []
        for spec in workflow.steps:
            if spec.kind == "agent":
                calls = len(items) if spec.for_each is not None else 1
                figures = (agents or {}).get(spec.agent)
                out_tokens[spec.id] = spec.max_tokens * calls
                estimates.append(_agent_estimate(spec, figures, calls, fanout))
                continue
            if spec.kind == "select":
                out_tokens[spec.id] = max(out_tokens[need] for need in spec.needs)
                estimates.append(StepEstimate(spec.id, tuple(spec.needs), None, 0, 0, Step(profile=FREE)))
                continue
            limit = max_tokens or spec.max_tokens
            step_allow = allowed_models(allow_models, spec.allow_models)
            upstream = sum(
                m.content.count("{" + need + "}") * out_tokens[need] for m in spec.messages for need in spec.needs
            )
            # None: a step that runs once, with no item.
            texts: list[str | None] = list(items) if spec.for_each is not None else [None]
            model = None
            input_tokens = []
            for text in texts:
                values = {GOAL: goal, **{need: "" for need in spec.needs}}
                if text is not None:
                    values[ITEM] = text
                messages = [ChatMessage(role=m.role, content=render(m.content, values)) for m in spec.messages]
                request = StepRequest(
                    task_id="preflight",
                    step_id=spec.id,
                    workflow=workflow.name,
                    role=spec.role,
                    messages=messages,
                    max_tokens=limit,
                    allow_models=step_allow,
                    deadline_ms=0,
                )
                tier = self.table.tier(request, prompt_chars(request) + upstream * CHARS_PER_TOKEN)
                model = pick_model(tier, step_allow, self.catalog)
                prompt_tokens = count_message_tokens(model.tokenizer, messages) if priced else 0
                input_tokens.append(prompt_tokens + upstream)
            if model is None:
                # No inputs, so no call: the rules pick the model of an empty item, to say which it would be.
                model = pick_model(self.table.default_tier, step_allow, self.catalog)
            latency_s, p_success = self.profiles[model.name]
            calls = len(texts)
            if spec.for_each is not None:
                # What a later step's placeholder receives: each input with its output.
                out_tokens[spec.id] = (
                    sum(count_message_tokens(model.tokenizer, [_user(text)]) for text in items) + calls * limit
                )
            else:
                out_tokens[spec.id] = limit
            per_call = 1.0 if p_success is None else p_success
            waves = math.ceil(calls / max(fanout, 1))
            profile = CallProfile(
                cost_usd=math.fsum(model.worst_case_cost(n, limit) for n in input_tokens),
                latency_s=latency_s * waves,
                # Any probability will do when it is unknown: total() reports the reliability as NaN.
                # A for_each step succeeds when every item does, each with its own retries.
                p_success=per_call if calls == 1 else (1.0 - (1.0 - per_call) ** (self.retries + 1)) ** calls,
            )
            step = Step(profile=profile, retries=self.retries if calls == 1 else 0)
            estimates.append(
                StepEstimate(
                    spec.id,
                    tuple(spec.needs),
                    model,
                    sum(input_tokens),
                    limit * calls,
                    step,
                    p_success is not None,
                    calls,
                )
            )
        return estimates

    @staticmethod
    def total(steps: list[StepEstimate]) -> PlanEstimate:
        """The figures of the whole plan; reliability and quality per dollar are NaN when a step's is unknown."""
        figures = estimate(plan_from_dag([(s.step_id, s.needs, s.step) for s in steps]))
        if all(s.p_known for s in steps):
            return figures
        return msgspec.structs.replace(figures, reliability=math.nan, quality_per_usd=math.nan)

    def call(self, request: StepRequest, priced: bool = True) -> tuple[float, float]:
        """One concrete call's worst-case cost (as the router will reserve it) and typical latency;
        raises PinningError when its allow-list permits no model.

        ``priced`` False gives a cost of 0 without counting the prompt, for a task with no budget:
        nothing here decides on its cost then (the router reserves every call against the caps with
        its own count), and counting is the dear part of the estimate: Mixtral's tokenizer takes
        0.13 s for a 120,000-token Mooncake prompt (docs/benchmarks.md, "Counting once")."""
        model = self.table.choose(request, self.catalog)
        latency_s = self.profiles[model.name][0]
        if not priced:
            return 0.0, latency_s
        worst_usd = model.worst_case_cost(count_message_tokens(model.tokenizer, request.messages), request.max_tokens)
        return worst_usd, latency_s


def _agent_estimate(spec: StepSpec, figures: AgentFigures | None, calls: int, fanout: int) -> StepEstimate:
    """An agent step of ``calls`` requests (one per input of a for_each step), ``fanout`` at once."""
    cost_usd, latency_s, p_success = figures or (0.0, 0.0, 1.0)
    profile = CallProfile(
        cost_usd=cost_usd * calls, latency_s=latency_s * math.ceil(calls / max(fanout, 1)), p_success=p_success**calls
    )
    step = Step(profile=profile, retries=(spec.retries or 0) if calls == 1 else 0)
    return StepEstimate(spec.id, tuple(spec.needs), None, 0, 0, step, figures is not None, calls)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def describe(figures: PlanEstimate, priced: bool = True) -> str:
    """A plan's figures in one line, for a refusal's reason (``priced`` False: its cost was not estimated)."""
    reliability = "unknown" if math.isnan(figures.reliability) else f"{figures.reliability:.2%}"
    cost = f"${figures.cost_usd:.4f} worst case" if priced else "cost not estimated (no budget)"
    return f"{cost}, {figures.latency_s:.2f} s critical path, {reliability} reliability"
