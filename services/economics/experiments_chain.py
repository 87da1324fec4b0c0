"""`frugalmesh experiment reliability-cliff`: seed 002's ``p^S`` measured through the mesh.

The claim (DESIGN.md, "Why it exists"): a chain of S steps succeeds with ``prod p_s`` (``p^S`` for
equal steps), and k retries lift a step to ``1-(1-p)^(k+1)``; the README's example is 98.5% per step,
83% for 12 steps.

How it is measured:

- A chain is S recorded prompts drawn without replacement, run one after another, each one mesh
  task (services/economics/mesh.py). A chain stops at its first wrong step (a pipeline has nothing
  right to hand on) and succeeds when every step's recorded grade is correct. The same chains run
  in every arm (a paired comparison), each arm as its own tenant, so no arm meets another's cache.
- Arms. ``weak``: every step pinned to the weak model. ``escalate``: a wrong step is asked once
  more, pinned to the strong model (one retry by escalation); the failure is known from the recorded
  grade, a perfect checker, so this arm is the most one escalation can buy. ``cascade``: the tenant
  is routed by the mesh's cascade policy, whose validator reads the weak answer and escalates what it
  distrusts: a real checker, which escalates some right answers and keeps some wrong ones (on MMLU,
  recorded without answer text, it has nothing to read).
- Prediction: ``p^S`` with p the weak model's recorded accuracy on the pool (the p the pre-flight
  estimate takes), and the seed's retry lift ``(1-(1-p)^2)^S``, which assumes the retry fails
  independently of the first try.
- Extra calls per point: (model calls per step in the arm - in ``weak``) / (the arm's per-step
  success - ``weak``'s, in percentage points). Per step, because with early stop a chain's calls
  depend on where it failed.

Not done: a step's output does not feed the next (the replay answers by the task's goal), so the
chain is the formula's best case, independent steps.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from services.economics.mesh import MeshRunner, StepOutcome, experiment_mesh
from services.economics.recorded import Dataset, accuracy, draw, recorded_model, recorded_pool, wilson
from services.routing.policies.routerfile import RouterFile
from services.runtime.catalog import Catalog
from services.runtime.data import Record
from services.runtime.settings import MeshSettings

DEFAULT_STEPS = (1, 2, 4, 8, 12, 20, 30, 40)
ARMS = ("weak", "escalate", "cascade")
# Where the README's example lives: the point the summary quotes.
REFERENCE_STEPS = 12
README_STEP_SUCCESS = 0.985


@dataclass(frozen=True)
class CliffOptions:
    data_dir: Path
    steps: Sequence[int] = DEFAULT_STEPS
    chains: int = 12
    dataset: Dataset = "all"
    seed: int = 7
    concurrency: int = 16


@dataclass
class ChainRun:
    """One chain in one arm: per step run, the tasks it took (one, or two when escalated)."""

    arm: str
    length: int
    steps: list[list[StepOutcome]]

    @property
    def succeeded(self) -> bool:
        return len(self.steps) == self.length and all(step[-1].correct for step in self.steps)


@dataclass(frozen=True)
class CliffPoint:
    arm: str
    length: int
    chains: int
    succeeded: int
    calls_per_chain: float
    cost_per_chain: float

    @property
    def success(self) -> float:
        return self.succeeded / self.chains if self.chains else 0.0


@dataclass(frozen=True)
class ArmSteps:
    """Per-step figures of one arm over every step its chains ran."""

    arm: str
    steps: int
    right: int
    calls: int
    cost_usd: float

    @property
    def success(self) -> float:
        return self.right / self.steps if self.steps else 0.0

    @property
    def calls_per_step(self) -> float:
        return self.calls / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class CliffResult:
    weak_model: str
    strong_model: str
    p_weak: float
    p_strong: float
    points: list[CliffPoint]
    arms: list[ArmSteps]
    wall_s: float

    def point(self, arm: str, length: int) -> CliffPoint:
        return next(p for p in self.points if p.arm == arm and p.length == length)

    def arm(self, name: str) -> ArmSteps:
        return next(a for a in self.arms if a.arm == name)

    def predicted(self, length: int, retries: int = 0) -> float:
        """The seed's formula: every step at p, lifted by ``retries`` independent retries."""
        return (1 - (1 - self.p_weak) ** (retries + 1)) ** length

    def extra_calls_per_point(self, arm: str) -> float | None:
        """Extra model calls per step for each percentage point of per-step success over ``weak``."""
        base, other = self.arm("weak"), self.arm(arm)
        lift = (other.success - base.success) * 100
        return (other.calls_per_step - base.calls_per_step) / lift if lift > 0 else None


async def _step(mesh: MeshRunner, arm: str, prompt: str, weak: str, strong: str) -> list[StepOutcome]:
    if arm == "cascade":
        return [await mesh.ask(prompt, "cliff-cascade")]
    first = await mesh.ask(prompt, f"cliff-{arm}", allow_models=[weak])
    if arm == "weak" or first.correct:
        return [first]
    return [first, await mesh.ask(prompt, f"cliff-{arm}", allow_models=[strong])]


async def _chain(mesh: MeshRunner, arm: str, prompts: list[Record], weak: str, strong: str) -> ChainRun:
    run = ChainRun(arm, len(prompts), [])
    for record in prompts:
        step = await _step(mesh, arm, record.prompt, weak, strong)
        run.steps.append(step)
        if not step[-1].correct:
            break
    return run


async def _run_arms(settings: MeshSettings, chains: list[list[Record]], weak: str, strong: str, concurrency: int):
    async with MeshRunner(settings, concurrency=concurrency) as mesh:
        runs = await asyncio.gather(*(_chain(mesh, arm, prompts, weak, strong) for arm in ARMS for prompts in chains))
        mesh.account()
    return runs


def reliability_cliff(options: CliffOptions) -> CliffResult:
    """Run every arm's chains through a mesh of its own and summarise them."""
    settings = MeshSettings()
    catalog = Catalog.load(settings.deploy_dir)
    # The cascade's own pair: the weak model it answers with first, the strong one it escalates to.
    router_file = tomllib.loads((settings.deploy_dir / "routing.toml").read_text())["policies"]["router"]
    router = RouterFile.load(settings.deploy_dir / router_file)
    weak, strong = recorded_model(catalog, router.weak_model), recorded_model(catalog, router.strong_model)
    pool = recorded_pool(options.data_dir, options.dataset)
    rng = random.Random(options.seed)
    lengths = sorted(set(options.steps))
    prompts = iter(draw(pool, options.chains * sum(lengths), rng))
    chains = [[next(prompts) for _ in range(length)] for length in lengths for _ in range(options.chains)]
    started = time.perf_counter()
    with experiment_mesh(options.data_dir, policies={"cliff-cascade": "cascade"}) as mesh_settings:
        runs = asyncio.run(_run_arms(mesh_settings, chains, weak.name, strong.name, options.concurrency))
    wall_s = time.perf_counter() - started
    points = []
    for arm in ARMS:
        for length in lengths:
            mine = [r for r in runs if r.arm == arm and r.length == length]
            tasks = [[o for step in r.steps for o in step] for r in mine]
            points.append(
                CliffPoint(
                    arm,
                    length,
                    len(mine),
                    sum(r.succeeded for r in mine),
                    sum(o.calls for t in tasks for o in t) / len(mine),
                    sum(o.cost_usd for t in tasks for o in t) / len(mine),
                )
            )
    arms = []
    for arm in ARMS:
        steps = [step for r in runs if r.arm == arm for step in r.steps]
        arms.append(
            ArmSteps(
                arm,
                len(steps),
                sum(step[-1].correct for step in steps),
                sum(o.calls for step in steps for o in step),
                sum(o.cost_usd for step in steps for o in step),
            )
        )
    return CliffResult(weak.name, strong.name, accuracy(pool, weak), accuracy(pool, strong), points, arms, wall_s)


def interval(point: CliffPoint) -> tuple[float, float]:
    return wilson(point.succeeded, point.chains)


def cliff_table(result: CliffResult) -> Table:
    """End-to-end success per chain length: measured (95% interval) beside the seed's formula."""
    p = result.p_weak
    table = Table(title=f"reliability cliff: chains of recorded steps on {result.weak_model} (p = {p:.1%})")
    table.add_column("steps S", justify="right")
    table.add_column("chains", justify="right")
    table.add_column("p^S (seed)", justify="right")
    table.add_column("weak, measured", justify="right")
    table.add_column("(1-(1-p)^2)^S (seed, 1 retry)", justify="right")
    table.add_column(f"escalate to {result.strong_model}", justify="right")
    table.add_column("cascade (validator)", justify="right")
    for length in sorted({point.length for point in result.points}):
        measured = [result.point(arm, length) for arm in ARMS]
        cells = [_share(point) for point in measured]
        table.add_row(
            str(length),
            str(measured[0].chains),
            f"{result.predicted(length):.1%}",
            cells[0],
            f"{result.predicted(length, retries=1):.1%}",
            cells[1],
            cells[2],
        )
    return table


def steps_table(result: CliffResult) -> Table:
    """Per step: what each arm's checker bought, and what each point of it cost in calls."""
    table = Table(title="per step: success bought by a second call")
    for column in ("arm", "steps run", "step success", "seed predicts", "model calls / step", "USD / step"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    table.add_column("extra calls / point", justify="right")
    seed = {"weak": result.predicted(1), "escalate": result.predicted(1, retries=1), "cascade": math.nan}
    for arm in result.arms:
        extra = result.extra_calls_per_point(arm.arm) if arm.arm != "weak" else None
        table.add_row(
            arm.arm,
            f"{arm.steps:,}",
            f"{arm.success:.1%}",
            "-" if math.isnan(seed[arm.arm]) else f"{seed[arm.arm]:.1%}",
            f"{arm.calls_per_step:.2f}",
            f"{arm.cost_usd / arm.steps:.6f}" if arm.steps else "-",
            "-" if extra is None else f"{extra:.3f}",
        )
    return table


def _share(point: CliffPoint) -> str:
    low, high = interval(point)
    return f"{point.success:.1%} [{low:.0%}, {high:.0%}]"


def cliff_plot(result: CliffResult, out: Path) -> Path:
    """Measured success per S (95% intervals) against the seed's curves, written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({point.length for point in result.points})
    grid = list(range(1, max(lengths) + 1))
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.plot(grid, [result.predicted(s) for s in grid], "--", color="C0", label=f"seed: p^S, p = {result.p_weak:.1%}")
    axes.plot(grid, [result.predicted(s, 1) for s in grid], "--", color="C1", label="seed: one independent retry")
    axes.plot(grid, [result.p_strong**s for s in grid], "--", color="C3", label=f"{result.strong_model} alone: p^S")
    axes.plot(grid, [README_STEP_SUCCESS**s for s in grid], ":", color="grey", label="README: 98.5% per step")
    labels = {"weak": "weak only", "escalate": "retry by escalation", "cascade": "cascade's validator"}
    for index, arm in enumerate(ARMS):
        points = [result.point(arm, s) for s in lengths]
        shares = [p.success for p in points]
        bounds = [interval(p) for p in points]
        errors = [
            [s - b[0] for s, b in zip(shares, bounds, strict=True)],
            [b[1] - s for s, b in zip(shares, bounds, strict=True)],
        ]
        axes.errorbar(
            lengths, shares, yerr=errors, fmt="o-", color=f"C{index}", capsize=3, label=f"measured: {labels[arm]}"
        )
    axes.set_xlabel("steps in the chain (S)")
    axes.set_ylabel("chains that succeeded end to end")
    axes.set_ylim(0, 1.02)
    axes.set_title("Reliability cliff: recorded outcomes through the mesh")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
