"""`frugalmesh experiment budget-sweep`: answer quality as a job's budget tightens, against a run that ignores it.

Seed 002 (project 3) asks what a budget buys when it binds: a budget-aware run should fail soft
(cheaper models, then partial results) and never overrun, where a budget-ignoring run spends what
it spends. Measured through a mesh of its own (services/economics/mesh.py) on recorded prompts:

- A job is S recorded questions (8 by default), each one ``answer`` task routed by the mesh; its
  quality is the share of its questions answered right. The same jobs run at every budget.
- The budget-ignoring run sends every step without a budget: its spend per job is what the mesh's
  routing costs, and its overrun at a budget B is that spend over B.
- A budget-aware run at job budget B sends the steps one after another, each as a task whose own
  budget (``Task.budget_usd``) is an equal share of what is left (left / steps to go, so what one
  step saves the next may spend). The mesh enforces it: the planner refuses a task whose worst case
  (the prompt plus max_tokens at list price) does not fit, before any call, and each call's worst
  case is reserved against it. A refused step is asked again pinned to each cheaper recorded model
  in turn (the caller's fallback: the planner does not reshape a plan itself), and skipped when none
  fits: the job ends with the answers it could pay for.
- The grid: B as multiples of the ignoring run's mean spend per job (16x down to 1/100x), each its
  own tenant, so the attempt counter (3 per goal and day) and the cache start fresh at each B.

Deliberately not done: cutting ``max_tokens`` to fit a budget (it changes the recorded answer
the replay would return, truncating it, and so its grade).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from services.economics.mesh import MeshRunner, StepOutcome, experiment_mesh
from services.economics.recorded import Dataset, draw, recorded_pool
from services.runtime.catalog import Catalog
from services.runtime.data import Record
from services.runtime.settings import MeshSettings

DEFAULT_MULTIPLES = (16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01)


@dataclass(frozen=True)
class BudgetOptions:
    data_dir: Path
    jobs: int = 20
    steps: int = 8
    multiples: Sequence[float] = DEFAULT_MULTIPLES
    dataset: Dataset = "all"
    seed: int = 7
    concurrency: int = 20  # jobs in flight


@dataclass(frozen=True)
class SweepRow:
    """One budget: the aware run's figures per job (mean over jobs), and the worst job's spend."""

    multiple: float
    budget_usd: float
    quality: float
    complete: float  # share of jobs with every question answered right
    answered: float  # share of questions answered at all
    cost_usd: float
    max_cost_usd: float
    fallbacks: float  # share of questions answered on a cheaper model after a refusal
    overrun: float  # the ignoring run's mean spend over this budget (1.0: on budget)


@dataclass(frozen=True)
class SweepResult:
    ignoring_quality: float
    ignoring_complete: float
    ignoring_cost_usd: float
    ignoring_max_cost_usd: float
    rows: list[SweepRow]
    wall_s: float


def cheaper_models(catalog: Catalog) -> list[str]:
    """The recorded models a refused step falls back to, dearest first (by worst-case output price)."""
    recorded = [m for m in catalog.models.values() if m.recorded_as]
    return [m.name for m in sorted(recorded, key=lambda m: (-m.output_usd_per_mtok, -m.input_usd_per_mtok))]


async def _aware_step(
    mesh: MeshRunner, record: Record, tenant: str, budget_usd: float, ladder: Sequence[str]
) -> list[StepOutcome]:
    """The routed step within ``budget_usd``; when refused, each model of ``ladder`` in turn."""
    tries = [await mesh.ask(record.prompt, tenant, budget_usd=budget_usd)]
    for model in ladder:
        if tries[-1].kind == "done" or tries[-1].planner_calls:
            break  # answered, or failed after spending: only a refusal before any call falls back
        tries.append(await mesh.ask(record.prompt, tenant, allow_models=[model], budget_usd=budget_usd))
    return tries


async def _aware_job(
    mesh: MeshRunner, prompts: Sequence[Record], tenant: str, budget_usd: float, ladder: Sequence[str]
) -> list[list[StepOutcome]]:
    steps = []
    left = budget_usd
    for index, record in enumerate(prompts):
        share = left / (len(prompts) - index)
        step = await _aware_step(mesh, record, tenant, share, ladder)
        steps.append(step)
        # The planner's figure, known at the task's end (the books are read once the run is over).
        left -= sum(o.planner_cost_usd for o in step)
    return steps


async def _ignoring(settings: MeshSettings, jobs: list[list[Record]], concurrency: int) -> list[list[StepOutcome]]:
    async with MeshRunner(settings, concurrency=concurrency) as mesh:
        runs = await asyncio.gather(
            *(asyncio.gather(*(mesh.ask(r.prompt, "budget-ignoring") for r in job)) for job in jobs)
        )
        mesh.account()
    return [list(run) for run in runs]


async def _aware(
    settings: MeshSettings, jobs: list[list[Record]], budgets: Sequence[float], ladder: Sequence[str], concurrency: int
) -> list[list[list[list[StepOutcome]]]]:
    async with MeshRunner(settings, concurrency=concurrency) as mesh:
        slots = asyncio.Semaphore(concurrency)

        async def one(prompts: list[Record], index: int, budget: float) -> list[list[StepOutcome]]:
            async with slots:
                return await _aware_job(mesh, prompts, f"budget-{index}", budget, ladder)

        runs = await asyncio.gather(
            *(asyncio.gather(*(one(job, index, budget) for job in jobs)) for index, budget in enumerate(budgets))
        )
        mesh.account()
    return [list(run) for run in runs]


def budget_sweep(options: BudgetOptions) -> SweepResult:
    """The ignoring run first (it sets the scale), then every budget of the grid, in one mesh."""
    catalog = Catalog.load(MeshSettings().deploy_dir)
    ladder = cheaper_models(catalog)
    rng = random.Random(options.seed)
    prompts = draw(recorded_pool(options.data_dir, options.dataset), options.jobs * options.steps, rng)
    jobs = [prompts[i * options.steps : (i + 1) * options.steps] for i in range(options.jobs)]
    started = time.perf_counter()
    with experiment_mesh(options.data_dir) as settings:
        ignoring = asyncio.run(_ignoring(settings, jobs, options.concurrency * options.steps))
        spend = [sum(o.cost_usd for o in job) for job in ignoring]
        mean_spend = sum(spend) / len(spend)
        budgets = [mean_spend * multiple for multiple in options.multiples]
        aware = asyncio.run(_aware(settings, jobs, budgets, ladder[1:], options.concurrency))
    rows = []
    for multiple, budget, runs in zip(options.multiples, budgets, aware, strict=True):
        costs = [sum(o.cost_usd for step in job for o in step) for job in runs]
        steps = [step for job in runs for step in job]
        rows.append(
            SweepRow(
                multiple=multiple,
                budget_usd=budget,
                quality=sum(step[-1].correct for step in steps) / len(steps),
                complete=sum(all(step[-1].correct for step in job) for job in runs) / len(runs),
                answered=sum(step[-1].kind == "done" for step in steps) / len(steps),
                cost_usd=sum(costs) / len(costs),
                max_cost_usd=max(costs),
                fallbacks=sum(len(step) > 1 and step[-1].kind == "done" for step in steps) / len(steps),
                overrun=mean_spend / budget if budget else float("inf"),
            )
        )
    correct = [o.correct for job in ignoring for o in job]
    complete = sum(all(o.correct for o in job) for job in ignoring) / len(ignoring)
    return SweepResult(
        sum(correct) / len(correct), complete, mean_spend, max(spend), rows, time.perf_counter() - started
    )


def sweep_table(result: SweepResult) -> Table:
    """Per budget: what the aware run kept and spent, beside the ignoring run's overrun of it."""
    table = Table(
        title=f"budget sweep: the budget-ignoring run answers {result.ignoring_quality:.1%} right "
        f"({result.ignoring_complete:.0%} of jobs all right) for ${result.ignoring_cost_usd:.6f} a job "
        f"(worst job ${result.ignoring_max_cost_usd:.6f})"
    )
    columns = (
        "budget x spend", "budget USD/job", "quality", "jobs all right", "answered", "on a cheaper model",
        "USD/job", "worst job USD", "within budget", "ignoring / budget",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(
            f"{row.multiple:g}",
            f"{row.budget_usd:.6f}",
            f"{row.quality:.1%}",
            f"{row.complete:.0%}",
            f"{row.answered:.0%}",
            f"{row.fallbacks:.0%}",
            f"{row.cost_usd:.6f}",
            f"{row.max_cost_usd:.6f}",
            "yes" if row.max_cost_usd <= row.budget_usd + 1e-12 else "NO",
            f"{row.overrun:.2f}x",
        )
    return table


def sweep_plot(result: SweepResult, out: Path) -> Path:
    """Quality and spend against the budget (log scale), aware beside ignoring, written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [row.budget_usd for row in result.rows]
    figure, (quality, spend) = plt.subplots(1, 2, figsize=(12, 4.5))
    quality.plot(budgets, [row.quality for row in result.rows], "o-", label="budget-aware: questions right")
    quality.plot(budgets, [row.answered for row in result.rows], "s:", label="budget-aware: questions answered")
    quality.axhline(result.ignoring_quality, color="C3", linestyle="--", label="budget-ignoring")
    quality.set_ylabel("share of questions")
    quality.set_ylim(0, 1.02)
    spend.plot(budgets, [row.cost_usd for row in result.rows], "o-", label="budget-aware: mean spend")
    spend.plot(budgets, [row.max_cost_usd for row in result.rows], "^:", label="budget-aware: worst job")
    spend.axhline(result.ignoring_cost_usd, color="C3", linestyle="--", label="budget-ignoring: mean spend")
    spend.plot(budgets, budgets, color="grey", linewidth=0.8, label="the budget")
    spend.set_yscale("log")
    spend.set_ylabel("USD per job")
    for axis, title in ((quality, "answer quality as the budget tightens"), (spend, "spend against the budget")):
        axis.set_xscale("log")
        axis.set_xlabel("budget per job, USD")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
