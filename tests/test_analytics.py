"""The aggregates the report reads (services/accountant/aggregates.py) and the cookbook of
docs/analytics.md, on the session's real ClickHouse.

The aggregates must say what the raw rows say: equal sums on generated rows (the benchmark's own
generator, through the accountant's DDL so the views fill as under ingest), equal after JetStream
redelivers a batch already stored (the real accountant's ingest), filled on an install that had rows
before them, and a duplicate the ingest cannot see (a re-publish past the stream's dedupe window)
found by the cookbook's reconciliation query and removed by a rebuild. Every SQL block of the
cookbook runs against the generated rows, so the page cannot rot.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from helpers import database_url
from nats.js.api import ConsumerConfig
from test_accountant import FAST, drained, publish_usage, store_and_crash_unacked, usage

from loadtest.bench.analytics import task_insert, usage_insert
from schemas.messages import UsageEvent
from schemas.subjects import DURABLE_USAGE_INGEST, STREAM_USAGE
from services.accountant import aggregates
from services.accountant.clickhouse import client, create_schema
from services.accountant.ddl import USAGE_EVENTS, quote_identifier
from services.accountant.rows import USAGE, usage_row
from services.analytics.data import bucket_seconds, parse_since
from services.runtime.streams import ensure_streams

DOC = Path(__file__).resolve().parents[1] / "docs" / "analytics.md"
COOKBOOK = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
RECONCILE = next(sql for sql in COOKBOOK if "extra_calls" in sql)
TASK_TOKENS = "SELECT task_id, calls, cost_usd FROM task_tokens ORDER BY task_id"
GENERATED_ROWS = 20_000

MINUTE_SUMS = "sum(calls), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost_usd)"
RAW_SUMS = "count(), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost_usd)"
KEYS = "tenant, model, tier, outcome"


@pytest.fixture(scope="module")
def generated(infra) -> str:
    """A database of generated rows (30 days to now); returns the analyst's URL on it."""
    database = "ana" + uuid.uuid4().hex[:8]
    writer = client(infra[1])
    create_schema(writer, database)
    end = datetime.now(UTC)
    writer.command(usage_insert(database, GENERATED_ROWS, end))
    writer.command(task_insert(database, GENERATED_ROWS, end))
    return database_url(infra.clickhouse_analyst_url, database)


def by_keys(ch, database: str) -> tuple[list[tuple], list[tuple]]:
    """(aggregate, raw) sums per tenant, model, tier and outcome."""
    db = quote_identifier(database)
    minute = ch.query(f"SELECT {KEYS}, {MINUTE_SUMS} FROM {db}.usage_minute GROUP BY {KEYS} ORDER BY {KEYS}")
    raw = ch.query(f"SELECT {KEYS}, {RAW_SUMS} FROM {db}.usage_events FINAL GROUP BY {KEYS} ORDER BY {KEYS}")
    return minute.result_rows, raw.result_rows


@pytest.mark.unit
def test_the_cookbook_has_at_least_fifteen_queries():
    assert len(COOKBOOK) >= 15


@pytest.mark.infra
@pytest.mark.parametrize("sql", COOKBOOK, ids=[f"q{i:02d}" for i in range(len(COOKBOOK))])
def test_each_cookbook_query_answers_on_real_rows(generated, sql):
    assert client(generated).query(sql).result_rows


@pytest.mark.infra
def test_the_aggregates_equal_the_raw_rows(generated, clickhouse_url):
    analyst = client(generated)
    database = analyst.database
    minute, raw = by_keys(analyst, database)
    assert minute == raw and sum(row[4] for row in raw) == GENERATED_ROWS
    task = analyst.query(
        "SELECT task_id, sum(calls), sum(input_tokens + output_tokens), sum(cost_usd), max(largest_call_tokens) "
        "FROM task_usage GROUP BY task_id ORDER BY task_id"
    ).result_rows
    view = analyst.query(
        "SELECT task_id, calls, total_tokens, cost_usd, largest_call_tokens FROM task_tokens ORDER BY task_id"
    ).result_rows
    assert task == view
    assert all(
        extra_calls == 0 and extra_cost == 0 for _, extra_calls, extra_cost in analyst.query(RECONCILE).result_rows
    )


@pytest.mark.infra
def test_an_install_with_rows_gets_its_aggregates_filled(clickhouse_url):
    writer = client(clickhouse_url)
    database = "old" + uuid.uuid4().hex[:8]
    db = quote_identifier(database)
    create_schema(writer, database)
    for view in (aggregates.USAGE_MINUTE_VIEW, aggregates.TASK_USAGE_VIEW):
        writer.command(f"DROP VIEW {db}.{view}")
    for table in aggregates.AGGREGATES:
        writer.command(f"DROP TABLE {db}.{table}")
    # Rows of an install from before the aggregates.
    writer.command(usage_insert(database, 3000, datetime.now(UTC)))
    create_schema(writer, database)
    minute, raw = by_keys(writer, database)
    assert minute == raw and sum(row[4] for row in raw) == 3000
    # A second start fills nothing again.
    create_schema(writer, database)
    assert by_keys(writer, database) == (minute, raw)


@pytest.mark.infra
async def test_exact_under_redelivery_and_a_late_duplicate_is_found_and_rebuilt(start_service, settings, ch, nc, infra):
    js = nc.jetstream()
    database = settings.subject_prefix
    stream = settings.subjects.stream(STREAM_USAGE)
    events = [usage(i) for i in range(100)]
    await ensure_streams(js, settings.subjects)
    await publish_usage(js, settings, events)
    # The crash window: a first accountant stored 60 rows and died before acking them.
    await store_and_crash_unacked(js, settings, ch, database, 60)
    await start_service("accountant", settings, database=database, **FAST)
    await drained(js, stream, DURABLE_USAGE_INGEST)

    analyst = client(database_url(infra.clickhouse_analyst_url, database))
    minute, raw = by_keys(analyst, database)
    assert minute == raw and sum(row[4] for row in raw) == 100
    assert analyst.query(RECONCILE).result_rows == [(202511, 0, 0)]

    # Past the stream's dedupe window a producer's retry is a new message: stored twice, counted twice.
    late = events[10:30]
    await publish_usage(js, settings, late, suffix="-late")
    await drained(js, stream, DURABLE_USAGE_INGEST)
    [(month, extra_calls, extra_cost)] = analyst.query(RECONCILE).result_rows
    assert (month, extra_calls) == (202511, 20)
    assert extra_cost == sum(row[14] for row in map(usage_row, late))

    tasks = "SELECT task_id, sum(calls), sum(cost_usd) FROM task_usage GROUP BY task_id ORDER BY task_id"
    assert analyst.query(tasks).result_rows != analyst.query(TASK_TOKENS).result_rows

    for statement in aggregates.rebuild(database, month):
        ch.command(statement)
    assert analyst.query(RECONCILE).result_rows == [(202511, 0, 0)]
    assert by_keys(analyst, database) == (minute, raw)
    assert analyst.query(tasks).result_rows == analyst.query(TASK_TOKENS).result_rows


@pytest.mark.unit
def test_since_and_bucket_sizes():
    assert parse_since("7d").days == 7 and parse_since("12h").total_seconds() == 43_200
    for bad in ("7", "d", "0d", "-1d", "7y"):
        with pytest.raises(ValueError, match="a unit m, h, d or w"):
            parse_since(bad)
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert bucket_seconds(start, start) == 60
    assert bucket_seconds(start, start.replace(day=2)) == 3600
    assert bucket_seconds(start, start.replace(day=30)) == 86_400
    assert bucket_seconds(None, None) == 60
