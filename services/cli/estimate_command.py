"""`frugalmesh estimate WORKFLOW`: the planner's pre-flight estimate of a workflow, without running it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from services.cli.options import POSITIVE


@click.command()
@click.argument("workflow")
@click.option("--goal", default="", help="The task's goal: its size sets prompt sizes and so routing and cost.")
@click.option("--budget", "budget_usd", type=POSITIVE, help="Check the plan against this budget, USD.")
@click.option("--deadline", "deadline_s", type=POSITIVE, help="Check the plan against this deadline, seconds.")
@click.option("--allow-model", "allow_models", multiple=True, help="Pin the task to these models (repeatable).")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Override every model step's max_tokens.")
@click.option("--item", "items", multiple=True, help="A task input, for a step run once per input (repeatable).")
@click.option("--items-file", type=click.File("r"), help="Task inputs, one per non-empty line (`-` reads stdin).")
@click.option("--data", type=click.Path(path_type=Path), help="Recorded data directory [FRUGALMESH_DATA or the cache].")
def estimate(
    workflow: str,
    goal: str,
    budget_usd: float | None,
    deadline_s: float | None,
    allow_models: tuple[str, ...],
    max_tokens: int | None,
    items: tuple[str, ...],
    items_file,
    data: Path | None,
) -> None:
    """Cost, critical-path latency, reliability and reliability per dollar of WORKFLOW, step by step.

    Exits 1 when the plan cannot fit --budget or --deadline: the planner would refuse the task.
    """
    from rich.console import Console
    from rich.table import Table

    from services.planner.config import PlannerConfig
    from services.planner.estimate import fits
    from services.planner.preflight import Preflight
    from services.planner.workflow import WorkflowError, load_workflows
    from services.routing.table import PinningError
    from services.runtime.settings import MeshSettings

    settings = MeshSettings()
    try:
        workflows = load_workflows(settings.deploy_dir / "workflows")
        preflight = Preflight.load(settings.deploy_dir, data or settings.data, PlannerConfig.load(settings.deploy_dir))
    except (WorkflowError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if workflow not in workflows:
        raise click.BadParameter(
            f"unknown workflow {workflow!r}; known: {', '.join(sorted(workflows))}", param_hint="WORKFLOW"
        )
    from_file = [line.strip() for line in items_file if line.strip()] if items_file else []
    # An input given twice is one input: the planner makes one call per distinct input.
    texts = list(dict.fromkeys([*items, *from_file]))
    per_input = [s.id for s in workflows[workflow].steps if s.for_each is not None]
    if per_input and not texts:
        texts = [""]
        click.echo(
            f"step {per_input[0]!r} runs once per task input and none was given (--item, --items-file): "
            "priced for one empty input",
            err=True,
        )
    try:
        steps = preflight.steps(workflows[workflow], goal, list(allow_models) or None, max_tokens, items=texts)
    except PinningError as exc:
        raise click.ClickException(str(exc)) from None
    total = Preflight.total(steps)

    console = Console(width=160)
    per_step = Table(
        "step",
        "model",
        "tier",
        "calls",
        "input tok",
        "max tok",
        "cost (worst)",
        "latency",
        "success (with retries)",
        title=workflow,
    )
    for step in steps:
        model = step.model
        per_step.add_row(
            step.step_id,
            model.name if model else "- (no call)",
            model.tier if model else "-",
            str(step.calls if model else 0),
            str(step.input_tokens),
            str(step.max_tokens),
            f"${step.step.cost_usd:.6f}",
            f"{step.step.latency_s:.1f} s",
            f"{step.step.reliability:.2%}" if step.p_known else "unknown",
        )
    console.print(per_step)
    summary = Table("workflow", "cost", "latency", "reliability", "q/$")
    if math.isnan(total.reliability):
        reliability = q_per_usd = "unknown"
    else:
        reliability = f"{total.reliability:.2%}"
        q_per_usd = "inf" if math.isinf(total.quality_per_usd) else f"{total.quality_per_usd:.1f}"
    summary.add_row(workflow, f"${total.cost_usd:.6f}", f"{total.latency_s:.1f} s", reliability, q_per_usd)
    console.print(summary)
    if math.isnan(total.reliability):
        click.echo(
            "reliability is unknown: a model has no recorded outcomes here (run `frugalmesh data fetch`, "
            "or set p_success for it in deploy/planner.toml)",
            err=True,
        )
    reason = fits(total, budget_usd, deadline_s)
    if reason is not None:
        click.echo(f"does not fit: {reason}; the planner would refuse this task before any call", err=True)
        sys.exit(1)
    if budget_usd is not None or deadline_s is not None:
        click.echo("fits the budget and deadline")
