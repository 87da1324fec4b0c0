"""`frugalmesh report`: the mesh's economics as one self-contained HTML file (services/analytics/report.py).

It reads ClickHouse as the read-only analyst, wherever `frugalmesh sql` would (the environment, a
running `frugalmesh up` stack, or the data a stopped stack left in the home folder). The month caps
of the pacing figure are the accountant's (caps in force, run-time changes included) when it
answers within a few seconds, else deploy/budgets.toml's, and the figure says which.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

from services.runtime.settings import MeshSettings

if TYPE_CHECKING:
    from services.analytics.report import Caps

ACCOUNTANT_TIMEOUT_S = 3.0


@click.command()
@click.option("--since", default="7d", show_default=True, help="How far back: e.g. 12h, 7d, 2w (m, h, d, w).")
@click.option("--tenant", default="", help="One tenant only [every tenant].")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="The HTML file to write.")
def report(since: str, tenant: str, out: Path) -> None:
    """Write an HTML report of spend, savings, pacing, latency, caching, defences and costliest tasks."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from services.analytics.data import ReportWindow, parse_since
    from services.analytics.report import build
    from services.embedded.servers import EmbeddedError
    from services.embedded.stack import clickhouse_for_queries, client_settings
    from services.runtime.catalog import Catalog

    try:
        window_length = parse_since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    if not out.parent.is_dir():
        raise click.BadParameter(f"{out.parent} is not a folder; create it or write elsewhere", param_hint="--out")
    settings = client_settings()
    now = datetime.now(UTC)
    window = ReportWindow(since=now - window_length, until=now, tenant=tenant)
    caps = month_caps(settings)
    try:
        with clickhouse_for_queries(settings) as target:
            where = urlsplit(target.url)
            try:
                # The writer's credentials standing in for an unconfigured analyst: read-only all the same.
                readonly = {"readonly": 1} if target.readonly else None
                ch = clickhouse_connect.get_client(dsn=target.url, settings=readonly)
            except Exception as exc:  # connection refused, bad credentials: the driver wraps them all
                raise click.ClickException(
                    f"cannot reach ClickHouse at {where.hostname}:{where.port} ({type(exc).__name__}). Is the mesh "
                    "up (`frugalmesh up`), or CLICKHOUSE_ANALYST_URL set?"
                ) from None
            try:
                page = build(ch, window, Catalog.load(settings.deploy_dir), caps)
            except ClickHouseError as exc:
                raise click.ClickException(_refused(exc)) from None
    except EmbeddedError as exc:
        raise click.ClickException(str(exc)) from None
    out.write_text(page)
    click.echo(f"wrote {out} ({len(page) // 1024} KiB): open it in a browser; it needs no network")


def _refused(exc: Exception) -> str:
    """ClickHouse's own message; a missing aggregate says how it comes to exist."""
    text = str(exc)
    message = text[text.find("Code: ") :].splitlines()[0] if "Code: " in text else text
    if "UNKNOWN_TABLE" in message:
        message += (
            "\nThe report reads the aggregates (usage_minute, task_usage) the accountant creates when it starts: "
            "start the accountant of this ClickHouse once (`frugalmesh up`), and they are filled from the rows stored"
        )
    return f"ClickHouse refused a report query: {message}"


def month_caps(settings: MeshSettings) -> Caps:
    """Month caps by scope (tenant name, or ``*`` for global): the accountant's, else the file's."""
    from services.accountant.budget import BUDGETS_FILE, BudgetConfig
    from services.accountant.ledger import dollars
    from services.analytics.report import Caps

    answered = _accountant_caps(settings)
    if answered is not None:
        return Caps(answered, "as the accountant holds them now")
    path = settings.deploy_dir / BUDGETS_FILE
    config = BudgetConfig.load(path)
    caps = {
        key: dollars(caps.month)
        for (scope, key), caps in config.caps.items()
        if scope in ("global", "tenant") and caps.month is not None
    }
    return Caps(caps, f"{path} (the accountant did not answer, so run-time changes are not shown)")


def _accountant_caps(settings: MeshSettings) -> dict[str, float] | None:
    from schemas.messages import BudgetQuery, BudgetState
    from services.cli.client import MeshClient

    async def ask() -> dict[str, float]:
        async with MeshClient(settings) as client:
            state = await client.bus.request(settings.subjects.budget_show, BudgetQuery(), BudgetState, 2.0)
        return {
            cap.key: cap.month_usd
            for cap in state.caps
            if cap.scope in ("global", "tenant") and cap.month_usd is not None
        }

    try:
        return asyncio.run(asyncio.wait_for(ask(), ACCOUNTANT_TIMEOUT_S))
    except Exception:  # no NATS, no accountant, a refusal: the file's caps stand in, and the figure says so
        return None
