"""Online routing judged on recorded data (`frugalmesh eval routing --online`).

The recorded prompts arrive once each, in a seeded random order, as traffic. Each is the step
the ``answer`` workflow sends, with its CSV file's name as its workflow (the tag a workflow or a
request tag would give live traffic), and goes through ``policies.execute`` with an
``OnlinePolicy`` started from ``--router`` (trained elsewhere). A call the policy shadows is
answered by the other model too (its cost counted as shadow cost), the recorded grades judge the
pair, and the policy learns the label; it retrains every ``retrain_every`` calls.

The judged window is the stream's last ``window_share`` (the policy has learned by then); its
figures keep the offline evaluation's fields, shadow cost included in ``cost_usd``, and the
offline policies and references are judged on the same window, with one reference of the online
policy's own kind: ``tag_hindsight``, the per-tag plan made with every tag's outcomes on the
window known (the ceiling of routing by tag). The learning curve is the same
figures over consecutive blocks of the stream. Labels live in memory here: the mesh's path
through ClickHouse (feedback, `router train --from-clickhouse`) is tested on its own.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import InferenceResult
from services.router_training.evaluate import PolicyResult, ReplayedCalls, answer_step, evaluate
from services.router_training.training import record_tag
from services.routing.policies import execute
from services.routing.policies.online import ONLINE, OnlinePolicy, OnlineSettings
from services.routing.policies.routerfile import RouterFile
from services.routing.policies.tags import TagPosterior, TagPrior, count_outcomes, plan_weak_shares
from services.routing.table import RoutingTable
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.data import Record


@dataclass(frozen=True)
class CallOutcome:
    """One call of the stream: what the caller got, what it cost, what learning cost."""

    tag: str
    strong: bool
    correct: bool
    cost_usd: float
    shadow_cost_usd: float
    shadowed: bool
    weak_correct: bool
    strong_correct: bool
    strong_cost_usd: float
    weak_cost_usd: float


@dataclass(frozen=True)
class OnlineResult(PolicyResult):
    """The ``online`` line: the offline fields over the window, plus what learning cost and how
    the policy improved over the stream."""

    shadow_calls: int = 0
    shadow_share: float = 0.0
    shadow_cost_usd: float = 0.0
    stream_n: int = 0
    stream_shadow_share: float = 0.0
    curve: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class OnlineEvaluation:
    online: OnlineResult
    # The offline policies and references over the same window (evaluate.evaluate).
    references: list[PolicyResult]
    target: float

    @property
    def results(self) -> list[PolicyResult]:
        return [self.online, *self.references]


def run_stream(
    records: Sequence[Record], policy: OnlinePolicy, catalog: Catalog, calls: ReplayedCalls
) -> list[CallOutcome]:
    weak, strong = catalog.model(policy.weak_model), catalog.model(policy.strong_model)

    async def run() -> list[CallOutcome]:
        outcomes = []
        for index, record in enumerate(records):
            step = answer_step(record.prompt, index, workflow=record_tag(record))

            async def call(model: ModelSpec, prompt: str = record.prompt) -> InferenceResult:
                return calls.result(prompt, model)

            result = await execute(policy, step, catalog, call)
            shadow = policy.shadow_model(step, catalog.model(result.model), catalog)
            weak_run, strong_run = calls.result(record.prompt, weak), calls.result(record.prompt, strong)
            if shadow is not None:
                # The judge of a replay: the recorded grades of both answers.
                policy.learn(step.workflow, bool(weak_run.graded), bool(strong_run.graded))
            outcomes.append(
                CallOutcome(
                    tag=step.workflow,
                    strong=result.model == strong.name,
                    correct=bool(result.graded),
                    cost_usd=result.cost_usd,
                    shadow_cost_usd=calls.result(record.prompt, shadow).cost_usd if shadow is not None else 0.0,
                    shadowed=shadow is not None,
                    weak_correct=bool(weak_run.graded),
                    strong_correct=bool(strong_run.graded),
                    strong_cost_usd=strong_run.cost_usd,
                    weak_cost_usd=weak_run.cost_usd,
                )
            )
        return outcomes

    return asyncio.run(run())


def summarize(outcomes: Sequence[CallOutcome], target: float) -> dict:
    """The offline fields over these calls, shadow cost included in ``cost_usd``."""
    n = len(outcomes)
    strong_accuracy = float(np.mean([o.strong_correct for o in outcomes]))
    accuracy = float(np.mean([o.correct for o in outcomes]))
    shadow_cost = float(sum(o.shadow_cost_usd for o in outcomes))
    cost = float(sum(o.cost_usd for o in outcomes)) + shadow_cost
    strong_only = float(sum(o.strong_cost_usd for o in outcomes))
    meets = accuracy >= target * strong_accuracy
    return {
        "n": n,
        "strong_share": float(np.mean([o.strong for o in outcomes])),
        "accuracy": accuracy,
        "strong_accuracy": strong_accuracy,
        "weak_accuracy": float(np.mean([o.weak_correct for o in outcomes])),
        "cost_usd": cost,
        "strong_only_cost_usd": strong_only,
        "cost_reduction": 1 - cost / strong_only,
        "meets_target": meets,
        "best_cost_reduction_at_target": 1 - cost / strong_only if meets else 0.0,
        "shadow_calls": sum(o.shadowed for o in outcomes),
        "shadow_share": float(np.mean([o.shadowed for o in outcomes])),
        "shadow_cost_usd": shadow_cost,
    }


def tag_hindsight(outcomes: Sequence[CallOutcome], target: float) -> PolicyResult:
    """``tag_hindsight``: per-tag random routing at the shares planned (``plan_weak_shares``, no
    caution) with each tag's outcomes on these very calls known; in expectation, like ``random``.
    The most any policy that routes by tag alone could keep weak here: a share only hindsight picks."""
    by_tag: dict[str, list[CallOutcome]] = {}
    for outcome in outcomes:
        by_tag.setdefault(outcome.tag, []).append(outcome)
    exact = {tag: count_outcomes([(o.weak_correct, o.strong_correct) for o in calls]) for tag, calls in by_tag.items()}
    # A prior of strength 0: each tag's posterior is its own outcome shares, with no spread.
    posteriors = {tag: TagPosterior.of(counts, TagPrior(np.full(4, 0.25), 0.0)) for tag, counts in exact.items()}
    shares = plan_weak_shares(posteriors, {tag: len(calls) for tag, calls in by_tag.items()}, target, caution=0.0)
    weak = np.array([shares[o.tag] for o in outcomes])
    strong_ok = np.array([o.strong_correct for o in outcomes])
    weak_ok = np.array([o.weak_correct for o in outcomes])
    accuracy = float(np.mean(weak * weak_ok + (1 - weak) * strong_ok))
    cost = float(sum(w * o.weak_cost_usd + (1 - w) * o.strong_cost_usd for w, o in zip(weak, outcomes, strict=True)))
    strong_only = float(sum(o.strong_cost_usd for o in outcomes))
    # A tolerance for shares set to meet the target exactly, which float rounding can miss.
    meets = accuracy >= target * float(strong_ok.mean()) - 1e-12
    return PolicyResult(
        policy="tag_hindsight",
        n=len(outcomes),
        strong_share=float(1 - weak.mean()),
        accuracy=accuracy,
        strong_accuracy=float(strong_ok.mean()),
        weak_accuracy=float(weak_ok.mean()),
        cost_usd=cost,
        strong_only_cost_usd=strong_only,
        cost_reduction=1 - cost / strong_only,
        meets_target=meets,
        best_cost_reduction_at_target=1 - cost / strong_only if meets else 0.0,
    )


def evaluate_online(
    records: Sequence[Record],
    router: RouterFile,
    table: RoutingTable,
    catalog: Catalog,
    settings: OnlineSettings,
    *,
    seed: int = 0,
    window_share: float = 0.5,
    blocks: int = 10,
) -> OnlineEvaluation:
    if len(records) < 2 * blocks:
        raise ValueError(f"an online evaluation needs at least {2 * blocks} prompts, not {len(records)}")
    if not 0 < window_share <= 1:
        raise ValueError(f"the judged window is a share of the stream, not {window_share}")
    stream = list(records)
    random.Random(seed).shuffle(stream)
    calls = ReplayedCalls(stream)
    outcomes = run_stream(stream, OnlinePolicy.from_file(router, settings), catalog, calls)
    start = len(stream) - max(1, round(window_share * len(stream)))
    edges = np.linspace(0, len(stream), blocks + 1).astype(int)
    curve = [
        {"calls": int(hi), **summarize(outcomes[lo:hi], settings.target)}
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    online = OnlineResult(
        policy=ONLINE,
        **summarize(outcomes[start:], settings.target),
        stream_n=len(stream),
        stream_shadow_share=float(np.mean([o.shadowed for o in outcomes])),
        curve=curve,
    )
    references = evaluate(stream[start:], router, table, catalog, settings.target).results
    references.append(tag_hindsight(outcomes[start:], settings.target))
    return OnlineEvaluation(online, references, settings.target)


def plot_online(evaluation: OnlineEvaluation, path: str, title: str) -> None:
    """The learning curve: per block of the stream, calls kept off the strong model and accuracy
    as a share of the strong model's, against the target and random routing's share at the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = evaluation.online.curve
    calls = [block["calls"] for block in curve]
    fig, (kept, quality) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    kept.plot(calls, [1 - b["strong_share"] for b in curve], "o-", label="online: calls kept off the strong model")
    kept.plot(calls, [b["cost_reduction"] for b in curve], "s--", label="online: cost reduction (shadow included)")
    kept.plot(calls, [b["shadow_share"] for b in curve], "x:", label="shadowed share")
    styles = {
        "learned": ("purple", "-.", "learned (offline, as calibrated)"),
        "random_calibrated": ("grey", "--", "random, share calibrated on training"),
        "random": ("black", ":", "random at the share that just meets the target (hindsight)"),
        "tag_hindsight": ("brown", ":", "per tag, shares planned with each tag's outcomes (hindsight)"),
    }
    for reference in evaluation.references:
        if reference.policy in styles:
            color, style, label = styles[reference.policy]
            kept.axhline(
                1 - reference.strong_share, color=color, linestyle=style, linewidth=0.9, label=f"{label}, last half"
            )
    kept.set_ylabel("share of calls")
    kept.set_ylim(0, 1)
    kept.legend(fontsize=6.5, loc="upper right")
    kept.grid(alpha=0.3)
    quality.plot(calls, [b["accuracy"] / b["strong_accuracy"] for b in curve], "o-", label="online")
    quality.axhline(evaluation.target, color="red", linewidth=0.8, label=f"target {evaluation.target:.0%}")
    quality.set_ylabel("accuracy / strong model's")
    quality.set_xlabel("calls so far (end of block)")
    quality.legend(fontsize=7)
    quality.grid(alpha=0.3)
    kept.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
