"""`frugalmesh schedule add|list|remove`: scheduled tasks, each run with a hard timeout (layer 1).

Schedules are stored in NATS KV (services/planner/schedule.py); every running planner fires them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import click
from croniter import croniter

from schemas.subjects import token
from services.cli.options import POSITIVE

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Duration(click.ParamType):
    """A duration with its unit: ``250ms``, ``60s``, ``5m``, ``1.5h``; converts to seconds."""

    name = "duration"

    def convert(self, value, param, ctx) -> float:
        """Seconds; a usage error saying how to write a duration otherwise."""
        if isinstance(value, float):
            return value
        match = _DURATION.match(value.strip().lower())
        if not match:
            self.fail(
                f"{value!r} is not a duration: write a number and a unit (ms, s, m or h), e.g. 60s or 5m", param, ctx
            )
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
        if seconds <= 0:
            self.fail(f"{value!r} is no time at all: a run needs a timeout above zero, e.g. 60s", param, ctx)
        return seconds


class Cron(click.ParamType):
    """A five-field cron expression (minute hour day-of-month month day-of-week), read in UTC."""

    name = "cron"

    def convert(self, value, param, ctx) -> str:
        """The expression with single spaces; a usage error with examples otherwise."""
        fields = value.split()
        if len(fields) != 5 or not croniter.is_valid(value):
            self.fail(
                f"{value!r} is not a cron expression: give five fields, minute hour day-of-month month "
                'day-of-week (UTC), quoted, e.g. "*/5 * * * *" for every five minutes or "0 6 * * 1" '
                "for Mondays at 06:00",
                param,
                ctx,
            )
        return " ".join(fields)


def _token(ctx, param, value: str) -> str:
    try:
        return token(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _with_bucket(action: Callable[..., Awaitable[T]]) -> T:
    """Run ``action(kv)`` against the schedules bucket of the mesh this CLI talks to."""
    from services.planner.schedule import schedules_bucket

    async def on(bus) -> T:
        return await action(await schedules_bucket(bus))

    return _with_bus(on)


def _with_bus(action: Callable[..., Awaitable[T]]) -> T:
    """Run ``action(bus)`` on a bus of the mesh this CLI talks to."""
    from services.cli.client import MeshClient
    from services.embedded.stack import client_settings

    async def go() -> T:
        async with MeshClient(client_settings()) as client:
            return await action(client.bus)

    try:
        return asyncio.run(go())
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def schedule() -> None:
    """Scheduled tasks: a cron expression, a task, and a hard timeout for each run."""


@schedule.command("add")
@click.argument("goal")
@click.option("--cron", "cron", type=Cron(), required=True, help='When to run, in UTC, e.g. "*/5 * * * *".')
@click.option("--timeout", "timeout_s", type=Duration(), required=True, help="Hard timeout of each run, e.g. 60s.")
@click.option("--workflow", default="answer", show_default=True)
@click.option("--tenant", default="default", show_default=True, callback=_token)
@click.option("--budget", "budget_usd", type=POSITIVE, help="Budget of each run, USD.")
def add(goal: str, cron: str, timeout_s: float, workflow: str, tenant: str, budget_usd: float | None) -> None:
    """Run GOAL on a schedule; prints the new schedule's id."""
    from services.embedded.stack import client_settings
    from services.planner.schedule import Schedule, add_schedule, new_schedule_id
    from services.planner.workflow import WorkflowError, load_workflows

    try:
        known = load_workflows(client_settings().deploy_dir / "workflows")
    except WorkflowError as exc:
        raise click.ClickException(str(exc)) from None
    if workflow not in known:
        raise click.BadParameter(
            f"unknown workflow {workflow!r}; known: {', '.join(sorted(known))}", param_hint="--workflow"
        )
    entry = Schedule(
        id=new_schedule_id(),
        cron=cron,
        timeout_s=timeout_s,
        workflow=workflow,
        goal=goal,
        tenant=tenant,
        budget_usd=budget_usd,
        created_ms=int(time.time() * 1000),
    )
    _with_bucket(lambda kv: add_schedule(kv, entry))
    click.echo(entry.id)


@schedule.command("list")
def list_() -> None:
    """Every schedule, with its next run."""
    from rich.console import Console
    from rich.table import Table

    from services.planner.schedule import list_schedules

    entries = _with_bus(list_schedules)
    now = datetime.now(UTC)
    table = Table("id", "cron (UTC)", "timeout", "workflow", "tenant", "budget", "next run (UTC)", "goal")
    for entry in entries:
        next_run = croniter(entry.cron, now).get_next(datetime)
        budget = "-" if entry.budget_usd is None else f"${entry.budget_usd:g}"
        table.add_row(
            entry.id,
            entry.cron,
            f"{entry.timeout_s:g}s",
            entry.workflow,
            entry.tenant,
            budget,
            f"{next_run:%Y-%m-%d %H:%M}",
            entry.goal,
        )
    Console(width=200).print(table)


@schedule.command("remove")
@click.argument("schedule_id", callback=_token)
def remove(schedule_id: str) -> None:
    """Stop a schedule (runs already submitted finish)."""
    from services.planner.schedule import remove_schedule

    if not _with_bucket(lambda kv: remove_schedule(kv, schedule_id)):
        raise click.ClickException(f"no schedule {schedule_id!r}; `frugalmesh schedule list` shows them")
    click.echo(f"removed {schedule_id}")
