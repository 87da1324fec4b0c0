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

A select step makes no call: $0, no time, always succeeds. Cache hits are not foreseen (the plan is
priced as if every call were paid), and a looping step (``retry_if``) is priced once, like a retry.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import msgspec

from schemas.messages import ChatMessage, StepRequest
from services.planner.config import PlannerConfig
from services.planner.estimate import CallProfile, Estimate, Step, estimate, plan_from_dag
from services.planner.workflow import GOAL, Workflow, render
from services.router.table import RoutingTable, pick_model
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.data import DataNotFound, load_recorded_outcomes, resolve_data_dir
from services.runtime.tokens import count_message_tokens

FREE = CallProfile(cost_usd=0.0, latency_s=0.0, p_success=1.0)


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


class Preflight:
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

    def steps(
        self, workflow: Workflow, goal: str, allow_models: list[str] | None, max_tokens: int | None
    ) -> list[StepEstimate]:
        """Each step priced; raises PinningError when the allow-list permits no model for a step."""
        out_tokens: dict[str, int] = {}
        estimates = []
        for spec in workflow.steps:
            if spec.kind == "select":
                out_tokens[spec.id] = max(out_tokens[need] for need in spec.needs)
                estimates.append(StepEstimate(spec.id, tuple(spec.needs), None, 0, 0, Step(profile=FREE)))
                continue
            limit = max_tokens or spec.max_tokens
            out_tokens[spec.id] = limit
            values = {GOAL: goal, **{need: "" for need in spec.needs}}
            messages = [ChatMessage(role=m.role, content=render(m.content, values)) for m in spec.messages]
            upstream = sum(
                m.content.count("{" + need + "}") * out_tokens[need] for m in spec.messages for need in spec.needs
            )
            request = StepRequest(
                task_id="preflight",
                step_id=spec.id,
                workflow=workflow.name,
                role=spec.role,
                messages=messages,
                max_tokens=limit,
                allow_models=allow_models,
                deadline_ms=0,
            )
            model = pick_model(self.table.tier(request, self.table.prompt_tokens(request) + upstream), allow_models, self.catalog)
            input_tokens = count_message_tokens(model.tokenizer, messages) + upstream
            latency_s, p_success = self.profiles[model.name]
            profile = CallProfile(
                cost_usd=model.worst_case_cost(input_tokens, limit),
                latency_s=latency_s,
                # Any probability will do when it is unknown: total() reports the reliability as NaN.
                p_success=1.0 if p_success is None else p_success,
            )
            step = Step(profile=profile, retries=self.retries)
            estimates.append(
                StepEstimate(spec.id, tuple(spec.needs), model, input_tokens, limit, step, p_success is not None)
            )
        return estimates

    @staticmethod
    def total(steps: list[StepEstimate]) -> Estimate:
        figures = estimate(plan_from_dag([(s.step_id, s.needs, s.step) for s in steps]))
        if all(s.p_known for s in steps):
            return figures
        return msgspec.structs.replace(figures, reliability=math.nan, quality_per_usd=math.nan)

    def call(self, request: StepRequest) -> tuple[float, float]:
        """One concrete call's worst-case cost (as the router will reserve it) and typical latency;
        raises PinningError when its allow-list permits no model."""
        model = self.table.choose(request, self.catalog)
        worst_usd = model.worst_case_cost(count_message_tokens(model.tokenizer, request.messages), request.max_tokens)
        return worst_usd, self.profiles[model.name][0]


def describe(figures: Estimate) -> str:
    reliability = "unknown" if math.isnan(figures.reliability) else f"{figures.reliability:.2%}"
    return f"${figures.cost_usd:.4f} worst case, {figures.latency_s:.2f} s critical path, {reliability} reliability"
