"""`frugalmesh experiment ...`: the seeds' economics measured through a real mesh on recorded outcomes.

Each command starts a mesh of its own (services/economics/mesh.py), runs recorded GSM8K and MMLU
prompts through it, prints its table and writes its plot (a PNG). The defaults run in a couple of
minutes on two cores; the options make a run larger or smaller. docs/economics.md reports them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from services.cli.options import POSITIVE
from services.economics.recorded import DATASETS, Dataset

DATASET = click.Choice(DATASETS)


def _data_option(function):
    return click.option(
        "--data", type=click.Path(path_type=Path), help="Recorded data directory [FRUGALMESH_DATA or the cache]."
    )(function)


def _common(default_out: str, concurrency: int = 16, concurrency_help: str = "Tasks in flight."):
    def decorate(function):
        for option in reversed(
            (
                click.option(
                    "--dataset", type=DATASET, default="all", show_default=True, help="Which recorded prompts to draw."
                ),
                click.option(
                    "--seed", default=7, show_default=True, help="Picks the prompts; the same seed, the same run."
                ),
                click.option(
                    "--concurrency",
                    type=click.IntRange(min=1),
                    default=concurrency,
                    show_default=True,
                    help=concurrency_help,
                ),
                click.option(
                    "--out",
                    type=click.Path(path_type=Path, dir_okay=False),
                    default=Path(default_out),
                    show_default=True,
                    help="Where the plot (PNG) is written.",
                ),
            )
        ):
            function = option(function)
        return _data_option(function)

    return decorate


def _data_dir(data: Path | None) -> Path:
    from services.runtime.data import DataNotFound, resolve_data_dir
    from services.runtime.settings import MeshSettings

    try:
        return resolve_data_dir(data or MeshSettings().data)
    except DataNotFound as exc:
        raise click.ClickException(f"{exc} (run `frugalmesh data fetch`, or pass --data)") from None


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 1:
        raise click.BadParameter(f"{text!r}: give chain lengths of 1 or more, comma-separated (e.g. 1,4,12)")
    return steps


@click.group()
def experiment() -> None:
    """The seeds' experiments, measured through a mesh on recorded outcomes (docs/economics.md)."""


@experiment.command("reliability-cliff")
@_common("reliability-cliff.png")
@click.option(
    "--steps", default="1,2,4,8,12,20,30,40", show_default=True, help="Chain lengths S to measure, comma-separated."
)
@click.option("--chains", type=click.IntRange(min=1), default=40, show_default=True, help="Chains per length and arm.")
def reliability_cliff_command(
    data: Path | None, dataset: Dataset, seed: int, concurrency: int, out: Path, steps: str, chains: int
) -> None:
    """End-to-end success of S-step chains against the predicted p^S, with the lift bought by one
    retry by escalation and by the cascade's validator, and the extra calls each point cost."""
    from services.economics.experiments_chain import (
        CliffOptions,
        cliff_plot,
        cliff_table,
        reliability_cliff,
        steps_table,
    )

    options = CliffOptions(_data_dir(data), _steps(steps), chains, dataset, seed, concurrency)
    _run(
        f"running {chains} chains per length and arm through a mesh of its own...", 120,
        lambda: reliability_cliff(options), lambda r: [cliff_table(r), steps_table(r)], lambda r: cliff_plot(r, out),
    )  # fmt: skip


@experiment.command("levers")
@_common("levers.png", 8, "Jobs in flight.")
@click.option("--jobs", type=click.IntRange(min=1), default=24, show_default=True, help="Jobs per lever.")
@click.option("--steps", type=click.IntRange(min=2), default=12, show_default=True, help="Steps of a baseline job.")
@click.option(
    "--time-scale", type=POSITIVE, default=0.2, show_default=True,
    help="Each model answers in planner.toml's latency_s times this.",
)  # fmt: skip
def levers_command(
    data: Path | None,
    dataset: Dataset,
    seed: int,
    concurrency: int,
    out: Path,
    jobs: int,
    steps: int,
    time_scale: float,
) -> None:
    """Seed 002's levers table (baseline, parallelise, route, cache, retry, cut steps, combined) run
    through the mesh on recorded prompts, beside the formula's prediction."""
    from services.economics.experiments_levers import LeversOptions, levers, levers_plot, levers_table

    options = LeversOptions(_data_dir(data), jobs, steps, time_scale, dataset, seed, concurrency)
    _run(
        f"running {jobs} jobs of {steps} steps per lever through a mesh of its own...", 170,
        lambda: levers(options), lambda r: [levers_table(r)], lambda r: levers_plot(r, out),
    )  # fmt: skip


def _run(
    start: str, width: int, run: Callable[[], Any], tables: Callable[[Any], list[Any]], plot: Callable[[Any], Path]
) -> None:
    """Run one experiment: say it started, print its tables and where its plot went (and how long it took);
    a ValueError it raises is the user's mistake, printed as such."""
    from rich.console import Console

    console = Console(width=max(Console().width, width))
    console.print(start)
    try:
        result = run()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    for table in tables(result):
        console.print(table)
    console.print(f"plot: {plot(result)} ({result.wall_s:.0f} s)")


def _multiples(text: str) -> list[float]:
    try:
        multiples = sorted({float(part) for part in text.split(",") if part.strip()}, reverse=True)
    except ValueError:
        multiples = []
    if not multiples or multiples[-1] <= 0:
        raise click.BadParameter(f"{text!r}: give budgets above 0 as multiples of the ignoring spend (e.g. 2,1,0.1)")
    return multiples


@experiment.command("budget-sweep")
@_common("budget-sweep.png", 20, "Jobs in flight.")
@click.option("--jobs", type=click.IntRange(min=1), default=20, show_default=True, help="Jobs per budget.")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Questions per job.")
@click.option(
    "--budgets", default="16,8,4,2,1,0.5,0.25,0.1,0.05,0.02,0.01", show_default=True,
    help="Job budgets as multiples of the budget-ignoring run's mean spend per job.",
)  # fmt: skip
def budget_sweep_command(
    data: Path | None, dataset: Dataset, seed: int, concurrency: int, out: Path, jobs: int, steps: int, budgets: str
) -> None:
    """Answer quality as a job's budget tightens (the mesh refuses what cannot fit; a refused step falls
    back to cheaper models, then is skipped), against a budget-ignoring run's overrun."""
    from services.economics.experiments_budget import BudgetOptions, budget_sweep, sweep_plot, sweep_table

    grid = _multiples(budgets)
    options = BudgetOptions(_data_dir(data), jobs, steps, grid, dataset, seed, concurrency)
    _run(
        f"running {jobs} jobs of {steps} questions at {len(grid)} budgets through a mesh of its own...", 150,
        lambda: budget_sweep(options), lambda r: [sweep_table(r)], lambda r: sweep_plot(r, out),
    )  # fmt: skip
