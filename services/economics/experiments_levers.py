"""`frugalmesh experiment levers`: seed 002's levers table run through the mesh beside its prediction.

The seed's table (reproduced by the pre-flight estimate, tests/test_estimate.py) takes a 12-step
sequential chain of premium calls and pulls one lever at a time: parallelise, route to a cheaper
tier, cache 6 of the 12 steps, retry each step once, cut to 6 steps, then all of them combined.
Here every lever runs on recorded prompts through a mesh of its own (services/economics/mesh.py):

- A job is S recorded prompts (12 by default), each step one ``answer`` task; the job succeeds when
  every step's answer is right. The same jobs run under every lever, each lever as its own tenant.
- ``baseline``: the steps one after another, pinned to the frontier model. ``parallelise``: all
  submitted at once. ``route``: not pinned, so the mesh's routing (deploy/routing.toml's policy for
  ``answer``) picks each step's model. ``cache``: half the steps were asked by the tenant before (a
  warm-up, not counted), so the router's cache answers them. ``retry``: a wrong step (known from its
  recorded grade: a perfect checker) is asked once more on the cheapest model whose recorded answers
  differ from the failed one's, since the same model would give the same recorded answer again (and
  its cache would serve it). ``cut``: only the first half of the steps. ``combined``: the cut job,
  parallel, routed, a third of it cached, failed steps retried.
- Latency: each model answers after its planner.toml ``latency_s`` times ``time_scale`` (0.2:
  five times faster than the estimate assumes, so a run takes seconds), the job's latency is its
  wall time from first submission to last answer, and the prediction uses the same scaled figures.
- Prediction: ``services.planner.estimate.estimate`` on the plan of each job, each step profiled by
  the pre-flight (``Preflight.steps``: the model the router's table picks, the worst-case price the
  planner reserves, the model's recorded accuracy as p), retries as the seed writes them (same p,
  independent, not priced). Predicted cost is therefore a ceiling: the worst case of every call.

Measured cost is the accountant's rows (retries included, the warm-up not), calls are the calls a
model answered (cache hits apart).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from rich.table import Table

from services.economics.mesh import MeshRunner, StepOutcome, experiment_mesh
from services.economics.recorded import Dataset, draw, recorded_pool, wilson
from services.planner.config import PlannerConfig
from services.planner.estimate import Group, Plan, Step, estimate
from services.planner.preflight import Preflight
from services.planner.workflow import Workflow, load_workflows
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.data import Record
from services.runtime.settings import MeshSettings


@dataclass(frozen=True)
class Lever:
    name: str
    steps: float  # share of the job's steps it runs (cut: 0.5)
    parallel: bool = False
    routed: bool = False
    cached: float = 0.0  # share of the steps it runs that the tenant asked before
    retry: bool = False


LEVERS = (
    Lever("baseline", 1.0),
    Lever("parallelise", 1.0, parallel=True),
    Lever("route", 1.0, routed=True),
    Lever("cache", 1.0, cached=0.5),
    Lever("retry", 1.0, retry=True),
    Lever("cut steps", 0.5),
    Lever("combined", 0.5, parallel=True, routed=True, cached=1 / 3, retry=True),
)


@dataclass(frozen=True)
class LeversOptions:
    data_dir: Path
    jobs: int = 24
    steps: int = 12
    time_scale: float = 0.2
    dataset: Dataset = "all"
    seed: int = 7
    # Jobs in flight: few enough that on two cores the mesh's own overhead stays small beside the
    # scaled latencies (at 40 jobs of 12 parallel steps it no longer is).
    concurrency: int = 8


@dataclass(frozen=True)
class LeverRow:
    lever: str
    steps: int
    jobs: int
    succeeded: int
    calls: float  # model calls per job
    cache_hits: float
    cost_usd: float
    latency_s: float
    predicted_cost_usd: float
    predicted_latency_s: float
    predicted_success: float

    @property
    def success(self) -> float:
        return self.succeeded / self.jobs if self.jobs else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.succeeded, self.jobs)


@dataclass(frozen=True)
class LeversResult:
    frontier: str
    rows: list[LeverRow]
    time_scale: float
    wall_s: float

    def row(self, lever: str) -> LeverRow:
        return next(r for r in self.rows if r.lever == lever)


@dataclass
class JobRun:
    steps: list[list[StepOutcome]]
    latency_s: float

    @property
    def succeeded(self) -> bool:
        return all(step[-1].correct for step in self.steps)


def _frontier(catalog: Catalog) -> ModelSpec:
    """The frontier model the baseline is pinned to: the cheapest recorded one (as the demo's baseline)."""
    candidates = [m for m in catalog.in_tier("frontier") if m.recorded_as]
    if not candidates:
        raise ValueError("the catalogue has no frontier model with recorded outcomes")
    return min(candidates, key=lambda m: (m.output_usd_per_mtok, m.input_usd_per_mtok))


def retry_model(catalog: Catalog, failed: str) -> str:
    """The cheapest model whose recorded answers are not the failed model's (the same model would
    repeat its recorded answer)."""
    column = catalog.models[failed].recorded_as if failed in catalog.models else None
    others = [m for m in catalog.models.values() if m.recorded_as and m.recorded_as != column]
    return min(others, key=lambda m: (m.output_usd_per_mtok, m.input_usd_per_mtok)).name


def _plan(
    lever: Lever, prompts: Sequence[Record], preflight: Preflight, workflow: Workflow, pin: list[str], scale: float
) -> Plan:
    """The job's plan as the seed's formula sees it, each step profiled by the pre-flight."""
    cached = round(len(prompts) * lever.cached)
    steps = []
    for index, record in enumerate(prompts):
        (profiled,) = preflight.steps(workflow, record.prompt, None if lever.routed else pin, None)
        profile = msgspec.structs.replace(profiled.step.profile, latency_s=profiled.step.profile.latency_s * scale)
        steps.append(Step(profile=profile, retries=1 if lever.retry else 0, cached=index < cached))
    if lever.parallel:
        return Plan((Group(tuple(steps)),))
    return Plan(tuple(Group((step,)) for step in steps))


async def _job(
    mesh: MeshRunner, catalog: Catalog, lever: Lever, prompts: Sequence[Record], pin: list[str], tenant: str
) -> JobRun:
    async def step(record: Record) -> list[StepOutcome]:
        first = await mesh.ask(record.prompt, tenant, allow_models=None if lever.routed else pin)
        if not lever.retry or first.correct or not first.model:
            return [first]
        return [first, await mesh.ask(record.prompt, tenant, allow_models=[retry_model(catalog, first.model)])]

    started = time.perf_counter()
    if lever.parallel:
        steps = list(await asyncio.gather(*(step(r) for r in prompts)))
    else:
        steps = [await step(r) for r in prompts]
    return JobRun(steps, time.perf_counter() - started)


async def _run_lever(
    settings: MeshSettings, catalog: Catalog, lever: Lever, jobs: list[list[Record]], pin: list[str], concurrency: int
) -> list[JobRun]:
    tenant = "levers-" + lever.name.replace(" ", "-")
    async with MeshRunner(settings, concurrency=concurrency * max(len(j) for j in jobs)) as mesh:
        warm = [r for job in jobs for r in job[: round(len(job) * lever.cached)]]
        await asyncio.gather(*(mesh.ask(r.prompt, tenant, allow_models=None if lever.routed else pin) for r in warm))
        mesh.outcomes.clear()  # the warm-up is yesterday's traffic: not this job's cost
        slots = asyncio.Semaphore(concurrency)

        async def one(prompts: list[Record]) -> JobRun:
            async with slots:
                return await _job(mesh, catalog, lever, prompts, pin, tenant)

        runs = list(await asyncio.gather(*(one(job) for job in jobs)))
        mesh.account()
    return runs


def levers(options: LeversOptions) -> LeversResult:
    """Run every lever's jobs through a mesh of its own and set each beside the formula's prediction."""
    settings = MeshSettings()
    catalog = Catalog.load(settings.deploy_dir)
    preflight = Preflight.load(settings.deploy_dir, options.data_dir, PlannerConfig.load(settings.deploy_dir))
    workflow = load_workflows(settings.deploy_dir / "workflows")["answer"]
    frontier = _frontier(catalog)
    pin = [frontier.name]
    rng = random.Random(options.seed)
    prompts = draw(recorded_pool(options.data_dir, options.dataset), options.jobs * options.steps, rng)
    jobs = [prompts[i * options.steps : (i + 1) * options.steps] for i in range(options.jobs)]
    rows = []
    started = time.perf_counter()
    with experiment_mesh(options.data_dir, time_scale=options.time_scale) as mesh_settings:
        for lever in LEVERS:
            mine = [job[: max(1, round(len(job) * lever.steps))] for job in jobs]
            runs = asyncio.run(_run_lever(mesh_settings, catalog, lever, mine, pin, options.concurrency))
            predictions = [estimate(_plan(lever, job, preflight, workflow, pin, options.time_scale)) for job in mine]
            outcomes = [o for run in runs for step in run.steps for o in step]
            n = len(runs)
            rows.append(
                LeverRow(
                    lever.name,
                    len(mine[0]),
                    n,
                    sum(run.succeeded for run in runs),
                    sum(o.calls for o in outcomes) / n,
                    sum(o.cache_hits for o in outcomes) / n,
                    sum(o.cost_usd for o in outcomes) / n,
                    sum(run.latency_s for run in runs) / n,
                    sum(p.cost_usd for p in predictions) / n,
                    sum(p.latency_s for p in predictions) / n,
                    sum(p.reliability for p in predictions) / n,
                )
            )
    return LeversResult(frontier.name, rows, options.time_scale, time.perf_counter() - started)


def levers_table(result: LeversResult) -> Table:
    """Each lever measured beside the formula, and its effect against the baseline both ways."""
    table = Table(
        title=f"levers: jobs of recorded steps through the mesh (baseline pinned to {result.frontier}; "
        f"latency at {result.time_scale:g}x the estimate's per-call figures)"
    )
    columns = (
        "lever", "steps", "calls (+hits)", "USD/job", "pred.", "cost x", "pred.", "latency s", "pred.", "latency x",
        "pred.", "success [95%]", "pred.",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "lever" else "right")
    base = result.row("baseline")
    for row in result.rows:
        low, high = row.interval
        table.add_row(
            row.lever,
            str(row.steps),
            f"{row.calls:.1f} (+{row.cache_hits:.1f})",
            f"{row.cost_usd:.4f}",
            f"{row.predicted_cost_usd:.4f}",
            _ratio(row.cost_usd, base.cost_usd),
            _ratio(row.predicted_cost_usd, base.predicted_cost_usd),
            f"{row.latency_s:.2f}",
            f"{row.predicted_latency_s:.2f}",
            _ratio(row.latency_s, base.latency_s),
            _ratio(row.predicted_latency_s, base.predicted_latency_s),
            f"{row.success:.0%} [{low:.0%}, {high:.0%}]",
            f"{row.predicted_success:.1%}",
        )
    return table


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def levers_plot(result: LeversResult, out: Path) -> Path:
    """Cost and latency against the baseline, and success, measured beside predicted, written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result.row("baseline")
    names = [row.lever for row in result.rows]
    positions = range(len(names))
    width = 0.38
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    panels = (
        ("cost against the baseline", lambda r: r.cost_usd / base.cost_usd,
         lambda r: r.predicted_cost_usd / base.predicted_cost_usd),
        ("latency against the baseline", lambda r: r.latency_s / base.latency_s,
         lambda r: r.predicted_latency_s / base.predicted_latency_s),
        ("jobs that succeeded", lambda r: r.success, lambda r: r.predicted_success),
    )  # fmt: skip
    for axis, (title, measured, predicted) in zip(axes, panels, strict=True):
        errors = None
        if axis is axes[2]:  # success is a share of jobs: its 95% interval
            errors = [
                [r.success - r.interval[0] for r in result.rows],
                [r.interval[1] - r.success for r in result.rows],
            ]
        axis.bar(
            [p - width / 2 for p in positions], [measured(r) for r in result.rows], width, yerr=errors, capsize=3,
            label="measured",
        )  # fmt: skip
        axis.bar([p + width / 2 for p in positions], [predicted(r) for r in result.rows], width, label="predicted")
        axis.set_xticks(list(positions), names, rotation=30, ha="right")
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[2].set_ylim(0, 1)
    axes[0].legend()
    figure.suptitle("Seed 002's levers through the mesh, beside the formula")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
