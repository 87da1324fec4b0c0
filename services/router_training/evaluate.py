"""Routing judged on recorded outcomes (`frugalmesh eval routing`).

Every prompt becomes the StepRequest the ``answer`` workflow sends, and goes through
``policies.execute``, the code the router service runs for live steps, with the policy objects
the service builds. Only the calls differ: here each is answered by the replay backend's
``replay`` (recorded answer and grade, tokens counted with the model's own tokenizer, priced
from deploy/models.toml), so costs are the ones the live mesh would meter for the same prompts.

Beside each policy's operating point, the learned policies' whole cost-quality curves are swept
over their thresholds (same scores, every threshold), with random routing and the oracle (the
weak model exactly where it is right) as references.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from schemas.messages import ChatMessage, InferenceResult, StepRequest
from services.inference.replay import replay
from services.routing.policies import CascadePolicy, LearnedPolicy, Policy, execute
from services.routing.policies.calibration import sweep
from services.routing.policies.fixed import FixedPolicy
from services.routing.policies.routerfile import RouterFile
from services.routing.table import RoutingTable
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.data import Record

# The answer workflow's one step (deploy/workflows/answer.toml).
WORKFLOW = "answer"
ROLE = "answer"
MAX_TOKENS = 512
# Replayed calls never wait, but a StepRequest needs a deadline.
FAR_DEADLINE_MS = 2**53


@dataclass(frozen=True)
class PolicyResult:
    """One line of `frugalmesh eval routing --json` (field names are an interface: keep them)."""

    policy: str
    n: int
    strong_share: float
    accuracy: float
    strong_accuracy: float
    weak_accuracy: float
    cost_usd: float
    strong_only_cost_usd: float
    cost_reduction: float
    meets_target: bool
    # The best cost reduction on the policy's curve that still meets the target (RouteLLM's
    # "savings at 95% quality"); for a policy without a threshold, its own point's, or 0.
    best_cost_reduction_at_target: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Curve:
    """Cost (USD) and accuracy at each threshold of a scored policy."""

    policy: str
    cost_usd: np.ndarray
    accuracy: np.ndarray


class ReplayedCalls:
    """The calls of a replay: each (prompt, model) answered once from the recording and reused
    by every policy, as InferenceResults priced like the replay backend's."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = {r.prompt: r for r in records}
        self._results: dict[tuple[str, str], InferenceResult] = {}

    def result(self, prompt: str, model: ModelSpec) -> InferenceResult:
        key = (prompt, model.name)
        if key not in self._results:
            messages = [ChatMessage(role="user", content=prompt)]
            completion = replay(self.records[prompt], model, messages, MAX_TOKENS)
            self._results[key] = InferenceResult(
                call_id="replay",
                model=model.name,
                provider_model=completion.provider_model,
                tier=model.tier,
                provider=model.provider,
                output=completion.output,
                finish_reason=completion.finish_reason,
                usage=completion.usage,
                cost_usd=model.cost(completion.usage),
                graded=completion.graded,
            )
        return self._results[key]


def answer_step(prompt: str, index: int, workflow: str = WORKFLOW) -> StepRequest:
    return StepRequest(
        task_id=f"eval-{index}",
        step_id="answer",
        tenant="eval",
        workflow=workflow,
        role=ROLE,
        messages=[ChatMessage(role="user", content=prompt)],
        max_tokens=MAX_TOKENS,
        deadline_ms=FAR_DEADLINE_MS,
    )


async def run_policy(
    policy: Policy, records: Sequence[Record], catalog: Catalog, calls: ReplayedCalls
) -> list[InferenceResult]:
    results = []
    for index, record in enumerate(records):
        step = answer_step(record.prompt, index)

        async def call(model: ModelSpec, prompt: str = record.prompt) -> InferenceResult:
            return calls.result(prompt, model)

        results.append(await execute(policy, step, catalog, call))
    return results


@dataclass(frozen=True)
class Evaluation:
    results: list[PolicyResult]
    curves: list[Curve]
    # Reference points (cost USD, accuracy): every prompt on the weak model, and on the strong one.
    weak_point: tuple[float, float]
    strong_point: tuple[float, float]
    target: float


def _best_at_target(costs: np.ndarray, accuracy: np.ndarray, floor: float, strong_only: float) -> float:
    ok = accuracy >= floor
    return float(1 - costs[ok].min() / strong_only) if ok.any() else 0.0


def evaluate(
    records: Sequence[Record], router: RouterFile, table: RoutingTable, catalog: Catalog, target: float
) -> Evaluation:
    """``fixed`` (the strong model), ``rules`` (``table``) and the router file's learned policies,
    then the random and oracle references."""
    if not records:
        raise ValueError("no prompts to evaluate")
    weak, strong = catalog.model(router.weak_model), catalog.model(router.strong_model)
    strong_name = strong.name
    calls = ReplayedCalls(records)
    weak_runs = [calls.result(r.prompt, weak) for r in records]
    strong_runs = [calls.result(r.prompt, strong) for r in records]
    weak_ok = np.array([bool(r.graded) for r in weak_runs])
    strong_ok = np.array([bool(r.graded) for r in strong_runs])
    weak_cost = np.array([r.cost_usd for r in weak_runs])
    strong_cost = np.array([r.cost_usd for r in strong_runs])
    strong_only, strong_accuracy = float(strong_cost.sum()), float(strong_ok.mean())
    floor = target * strong_accuracy
    n = len(records)

    policies: list[tuple[str, Policy]] = [("fixed", FixedPolicy(strong_name)), ("rules", table)]
    curves: list[Curve] = []
    if router.prompt_model:
        learned = LearnedPolicy.from_file(router)
        policies.append(("learned", learned))
        scores = learned.scores([r.prompt for r in records])
        curves.append(_curve("learned", scores, weak_ok, strong_ok, weak_cost, strong_cost, cascade=False))
    if router.answer_model:
        cascade = CascadePolicy.from_file(router)
        policies.append(("cascade", cascade))
        scores = np.array([cascade.validator.score(r.output) for r in weak_runs])
        curves.append(_curve("cascade", scores, weak_ok, strong_ok, weak_cost, strong_cost, cascade=True))
    by_name = {c.policy: c for c in curves}

    async def run_all() -> list[list[InferenceResult]]:
        return [await run_policy(policy, records, catalog, calls) for _, policy in policies]

    results = []
    for (name, _), finals in zip(policies, asyncio.run(run_all()), strict=True):
        cost = float(sum(r.cost_usd for r in finals))
        accuracy = float(np.mean([bool(r.graded) for r in finals]))
        curve = by_name.get(name)
        best = (
            _best_at_target(curve.cost_usd, curve.accuracy, floor, strong_only)
            if curve
            else (1 - cost / strong_only if accuracy >= floor else 0.0)
        )
        results.append(
            PolicyResult(
                policy=name,
                n=n,
                strong_share=float(np.mean([r.model == strong_name for r in finals])),
                accuracy=accuracy,
                strong_accuracy=strong_accuracy,
                weak_accuracy=float(weak_ok.mean()),
                cost_usd=cost,
                strong_only_cost_usd=strong_only,
                cost_reduction=1 - cost / strong_only,
                meets_target=accuracy >= floor,
                best_cost_reduction_at_target=best,
            )
        )
    calibrated = router.prompt_model.random_weak_share if router.prompt_model else None
    results.extend(_references(weak_ok, strong_ok, weak_cost, strong_cost, target, calibrated))
    return Evaluation(
        results=results,
        curves=curves,
        weak_point=(float(weak_cost.sum()), float(weak_ok.mean())),
        strong_point=(strong_only, strong_accuracy),
        target=target,
    )


def _curve(
    name: str,
    scores: np.ndarray,
    weak_ok: np.ndarray,
    strong_ok: np.ndarray,
    weak_cost: np.ndarray,
    strong_cost: np.ndarray,
    *,
    cascade: bool,
) -> Curve:
    """Cost and accuracy at every threshold: prompts scoring at or above it stay weak. A cascade
    pays the weak call on every prompt and the strong one where it escalates."""
    _, weak_share, accuracy = sweep(scores, weak_ok, strong_ok)
    order = np.argsort(-scores, kind="stable")
    kept_weak = np.concatenate([[0.0], np.cumsum(weak_cost[order])])
    escalated = np.concatenate([np.cumsum(strong_cost[order][::-1])[::-1], [0.0]])
    cuts = np.rint(weak_share * len(scores)).astype(int)
    base = weak_cost.sum() if cascade else kept_weak[cuts]
    return Curve(name, base + escalated[cuts], accuracy)


def _references(
    weak_ok: np.ndarray,
    strong_ok: np.ndarray,
    weak_cost: np.ndarray,
    strong_cost: np.ndarray,
    target: float,
    calibrated_weak_share: float | None = None,
) -> list[PolicyResult]:
    """Random routing at the strong share that just meets the target on these prompts (in
    expectation; a share only someone who knew their outcomes could pick), the oracle, and, when
    the router file has one, random routing at the weak share calibrated on its training folds
    (``random_calibrated``: the random router one could actually deploy)."""
    w, s = float(weak_ok.mean()), float(strong_ok.mean())
    share = 1.0 if s <= w else float(np.clip((target * s - w) / (s - w), 0.0, 1.0))
    oracle_strong = ~weak_ok
    oracle_cost = float(np.where(oracle_strong, strong_cost, weak_cost).sum())
    oracle_accuracy = float(np.where(oracle_strong, strong_ok, weak_ok).mean())
    strong_only = float(strong_cost.sum())

    def point(policy: str, strong_share: float, cost: float, accuracy: float) -> PolicyResult:
        # A tolerance for the share set to meet the target exactly, which float rounding can miss.
        meets = accuracy >= target * s - 1e-12
        reduction = 1 - cost / strong_only
        return PolicyResult(
            policy=policy,
            strong_share=strong_share,
            accuracy=accuracy,
            cost_usd=cost,
            cost_reduction=reduction,
            meets_target=meets,
            best_cost_reduction_at_target=reduction if meets else 0.0,
            n=len(weak_ok),
            strong_accuracy=s,
            weak_accuracy=w,
            strong_only_cost_usd=strong_only,
        )

    def random_at(policy: str, strong_share: float) -> PolicyResult:
        cost = (1 - strong_share) * float(weak_cost.sum()) + strong_share * strong_only
        return point(policy, strong_share, cost, (1 - strong_share) * w + strong_share * s)

    references = [
        random_at("random", share),
        point("oracle", float(oracle_strong.mean()), oracle_cost, oracle_accuracy),
    ]
    if calibrated_weak_share is not None:
        references.append(random_at("random_calibrated", 1 - calibrated_weak_share))
    return references


def plot(evaluation: Evaluation, path: Path, title: str) -> None:
    """Each scored policy's cost-quality curve, the fixed points, random routing and the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strong_cost, strong_accuracy = evaluation.strong_point
    weak_cost, weak_accuracy = evaluation.weak_point
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([weak_cost / strong_cost, 1], [weak_accuracy, strong_accuracy], "--", color="grey", label="random")
    for curve in evaluation.curves:
        ax.plot(curve.cost_usd / strong_cost, curve.accuracy, label=curve.policy)
    for result in evaluation.results:
        if result.policy == "oracle":
            ax.plot(
                [result.cost_usd / strong_cost], [result.accuracy], "*", color="gold", markersize=14, label="oracle"
            )
        elif not result.policy.startswith("random"):
            ax.plot([result.cost_usd / strong_cost], [result.accuracy], "o", label=f"{result.policy} (as configured)")
    ax.axhline(
        evaluation.target * strong_accuracy, color="red", linewidth=0.8, label=f"{evaluation.target:.0%} of strong"
    )
    ax.set_xlabel("cost, share of strong model only")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
