"""What a report is drawn from: its window, the parameters its queries take, and their results.

Times are UTC. The spend-over-time bucket is picked from the data's own span (not the window's),
so a demo run of two minutes and a month of traffic both come out as a readable number of bars.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from services.accountant.pacing import month_bounds
from services.analytics.queries import Query
from services.runtime.catalog import Catalog

# Bucket sizes in seconds, finest first: the first giving at most MAX_BUCKETS over the data's span wins.
BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86_400)
MAX_BUCKETS = 60


@dataclass(frozen=True)
class ReportWindow:
    """The report's scope: calls from ``since`` to ``until``; ``tenant`` '' for every tenant."""

    since: datetime
    until: datetime
    tenant: str = ""

    @property
    def month_start(self) -> datetime:
        start_ms, _ = month_bounds(int(self.until.timestamp() * 1000))
        return datetime.fromtimestamp(start_ms / 1000, tz=UTC)

    @property
    def month_end(self) -> datetime:
        _, end_ms = month_bounds(int(self.until.timestamp() * 1000))
        return datetime.fromtimestamp(end_ms / 1000, tz=UTC)


@dataclass(frozen=True)
class Result:
    """One query's answer and how long ClickHouse took, as the client saw it."""

    query: Query
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    elapsed_ms: float

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m`` or ``2w`` as a duration; ValueError saying the form otherwise."""
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    number, unit = text[:-1], text[-1:].lower()
    if unit not in units or not number.isdigit() or int(number) == 0:
        raise ValueError(f"--since {text!r}: give a positive whole number and a unit m, h, d or w (e.g. 7d, 12h)")
    return timedelta(**{units[unit]: int(number)})


def bucket_seconds(first: datetime | None, last: datetime | None) -> int:
    if first is None or last is None:
        return BUCKETS_S[0]
    span_s = (last - first).total_seconds() + 60
    return next((b for b in BUCKETS_S if span_s / b <= MAX_BUCKETS), BUCKETS_S[-1])


def frontier_prices(catalog: Catalog) -> tuple[str, tuple[float, float, float]]:
    """The frontier model the counterfactual prices calls on (the cheapest frontier model, by output
    then input price, as `frugalmesh demo`'s baseline picks it) and its input, cached-input and output
    USD per million tokens."""
    frontier = catalog.in_tier("frontier")
    if not frontier:
        raise ValueError("the catalogue (deploy/models.toml) has no frontier model to price the counterfactual on")
    model = min(frontier, key=lambda m: (m.output_usd_per_mtok, m.input_usd_per_mtok))
    cached = model.cached_input_usd_per_mtok
    prices = (
        model.input_usd_per_mtok,
        model.input_usd_per_mtok if cached is None else cached,
        model.output_usd_per_mtok,
    )
    return model.name, prices


def query_parameters(
    window: ReportWindow,
    *,
    bucket_s: int,
    frontier: tuple[float, float, float],
    tasks: list[str] | None = None,
) -> dict[str, Any]:
    """Every parameter any report query takes (ClickHouse ignores the ones a query does not name)."""
    return {
        "since": window.since,
        "tenant": window.tenant,
        "month_start": window.month_start,
        "bucket_s": bucket_s,
        "frontier_input_usd_per_mtok": frontier[0],
        "frontier_cached_input_usd_per_mtok": frontier[1],
        "frontier_output_usd_per_mtok": frontier[2],
        "tasks": tasks or [],
    }


def used_parameters(query: Query, parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters ``query`` names, for showing beside its SQL."""
    return {name: value for name, value in parameters.items() if "{" + name + ":" in query.sql}


def fetch(ch: Client, query: Query, parameters: dict[str, Any]) -> Result:
    started = time.perf_counter()
    answer = ch.query(query.sql, parameters=used_parameters(query, parameters))
    elapsed_ms = (time.perf_counter() - started) * 1000
    return Result(query, tuple(answer.column_names), [tuple(row) for row in answer.result_rows], elapsed_ms)
