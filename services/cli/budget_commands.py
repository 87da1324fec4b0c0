"""`frugalmesh budget set|show`, `frugalmesh kill` and `frugalmesh clear`.

Each asks the accountant, the one writer of caps and switches (services/accountant/operators.py):
changes on the operator's own subject (``mesh.operator.<name>.budget`` / ``.kill``, ``<name>`` from
the NATS credential, which the server checks), so the accountant records who made each one; queries
on ``mesh.budget.show``. Without an accountant nothing changes, and nothing paid runs either (every
paid call is reserved with it first).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import click
import msgspec

from schemas.messages import (
    MAX_USD,
    BudgetQuery,
    BudgetScope,
    BudgetState,
    BudgetUpdate,
    BudgetWindow,
    KillScope,
    KillSwitch,
    SpendScope,
)
from schemas.subjects import OPERATOR_BUDGET, OPERATOR_KILL
from services.runtime.settings import MeshSettings

T = TypeVar("T")

REQUEST_TIMEOUT_S = 5.0


def _settings() -> MeshSettings:
    from services.embedded.stack import client_settings

    return client_settings()


async def _request(settings: MeshSettings, subject: str, message: msgspec.Struct, reply_type: type[T]) -> T:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from services.cli.client import MeshClient
    from services.runtime.bus import Rejected

    async with MeshClient(settings) as client:
        try:
            state = await client.bus.request(subject, message, reply_type, REQUEST_TIMEOUT_S)
        except (NoRespondersError, NatsTimeout):
            raise click.ClickException(
                f"no answer from the accountant on {subject}; "
                "is it running (`frugalmesh up` or `frugalmesh run accountant`)?"
            ) from None
        except Rejected as exc:
            raise click.ClickException(f"the accountant refused the request: {exc}") from None
    if isinstance(state, BudgetState) and state.error:
        raise click.ClickException(state.error)
    return state


def operator_subject(settings: MeshSettings, action: str) -> str:
    """Where this operator asks the accountant for ``action``: its own subject, named in its credential."""
    try:
        return settings.subjects.operator(settings.operator, action)
    except ValueError as exc:  # not an operator's credential
        raise click.ClickException(str(exc)) from None


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ConnectionError as exc:  # MeshClient says what it could not reach and how to start it
        raise click.ClickException(str(exc)) from None


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.6f}"


def _print(state: BudgetState) -> None:
    rows = [("scope", "key", "window", "period", "settled", "reserved", "cap", "left")]
    for s in state.spend:
        left = None if s.cap_usd is None else s.cap_usd - s.settled_usd - s.reserved_usd
        rows.append(
            (s.scope, s.key, s.window, s.period, _usd(s.settled_usd), _usd(s.reserved_usd), _usd(s.cap_usd), _usd(left))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    click.echo(f"{state.outstanding} outstanding reservation(s)")


@click.group()
def budget() -> None:
    """Budget caps: global, per tenant, per model and per virtual key (day and month, USD)."""


@budget.command("set")
@click.option("--scope", type=click.Choice(["global", "tenant", "model", "key"]), required=True)
@click.option("--key", default="*", help="The tenant or model name, or the virtual key's id (not for global).")
# Checked here against the wire bound, so a mistake is named by its option rather than refused by the accountant.
@click.option("--day", "day_usd", type=click.FloatRange(0, MAX_USD), help="Cap per UTC day, USD.")
@click.option("--month", "month_usd", type=click.FloatRange(0, MAX_USD), help="Cap per UTC month, USD.")
@click.option("--no-day", is_flag=True, help="Remove the day cap.")
@click.option("--no-month", is_flag=True, help="Remove the month cap.")
def budget_set(
    scope: BudgetScope,  # click.Choice has checked it
    key: str,
    day_usd: float | None,
    month_usd: float | None,
    no_day: bool,
    no_month: bool,
) -> None:
    """Change a scope's caps at run time (kept across accountant restarts)."""
    if day_usd is None and month_usd is None and not (no_day or no_month):
        raise click.UsageError("give --day and/or --month (or --no-day / --no-month)")
    windows: tuple[tuple[BudgetWindow, bool], ...] = (("day", no_day), ("month", no_month))
    unset = [w for w, flag in windows if flag]
    update = BudgetUpdate(scope=scope, key=key, day_usd=day_usd, month_usd=month_usd, unset=unset)
    settings = _settings()
    _print(
        _run(_request(settings, operator_subject(settings, OPERATOR_BUDGET), update, BudgetState))
    )


@budget.command("show")
@click.option("--scope", type=click.Choice(["global", "tenant", "model", "key", "task"]))
@click.option("--key", help="One tenant, model, virtual key id or task.")
@click.option("--json", "as_json", is_flag=True, help="Print the accountant's BudgetState as JSON.")
def budget_show(
    scope: SpendScope | None,  # click.Choice has checked it
    key: str | None,
    as_json: bool,
) -> None:
    """Caps in force and spend in the current day and month (tasks with --scope task)."""
    settings = _settings()
    state = _run(_request(settings, settings.subjects.budget_show, BudgetQuery(scope=scope, key=key), BudgetState))
    if as_json:
        click.echo(msgspec.json.encode(state).decode())
    else:
        _print(state)


def _switch(scope: KillScope, key: str | None, tripped: bool, reason: str) -> None:
    if scope == "global":
        key = "*"
    elif not key:
        raise click.UsageError(f"--key is required for --scope {scope}")
    switch = KillSwitch(scope=scope, key=key, tripped=tripped, reason=reason, time_ms=0)
    settings = _settings()
    subject = operator_subject(settings, OPERATOR_KILL)
    written = _run(_request(settings, subject, switch, KillSwitch))
    where = "global" if scope == "global" else f"{scope} {key}"
    click.echo(f"kill switch {'tripped' if tripped else 'cleared'}: {where} (by {written.by})")


SCOPE = click.Choice(["global", "tenant", "task", "model", "key"])
KEY_HELP = "The tenant, <tenant>.<task id>, the model, or the virtual key's id (fmk_...); not for global."


@click.command()
@click.option("--scope", type=SCOPE, required=True)
@click.option("--key", help=KEY_HELP)
@click.option("--reason", default="operator kill", show_default=True)
def kill(scope: KillScope, key: str | None, reason: str) -> None:  # click.Choice (SCOPE) has checked scope
    """Trip the kill switch: no new paid call starts in this scope, calls in flight are cancelled."""
    _switch(scope, key, True, reason)


@click.command()
@click.option("--scope", type=SCOPE, required=True)
@click.option("--key", help=KEY_HELP)
@click.option("--reason", default="operator clear", show_default=True)
def clear(scope: KillScope, key: str | None, reason: str) -> None:  # click.Choice (SCOPE) has checked scope
    """Lift the kill switch of a scope."""
    _switch(scope, key, False, reason)
