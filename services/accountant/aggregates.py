"""Aggregates kept by materialized views over ``usage_events``: what the report and the cookbook read
instead of the raw rows (docs/analytics.md).

``usage_minute``: one row per UTC minute, tenant, model, tier and outcome with the sums (calls,
tokens, cost) and the latency and time-to-first-token quantile states (t-digest, levels 0.5, 0.95,
0.99: TensorZero's ModelProviderStatistics pattern). ``task_usage``: one row per task with its
sums, its largest single call and its first and last call. Both are AggregatingMergeTree: a part
holds partial states, a merge combines them, and a query finishes them (``sum``, ``max``,
``quantilesTDigestMerge``) so it is right before and after merges alike.

Exactness. A materialized view sees every block inserted into ``usage_events``, duplicates included,
and cannot take one back. The accountant's ingest drops every redelivered message whose key is
already stored before it inserts (services/accountant/ingest.py), so JetStream redelivery, a failed
insert retried and an accountant crash between insert and ack add nothing here: the sums equal
those of ``usage_events FINAL``. Two cases still reach the view twice: an event re-published by its
producer after the stream's duplicate window (600 s) and two accountants inserting the same key at
the same moment. Each adds that one call once more (its cost, tokens and one latency sample) to
the minute it happened in: the aggregates then over-count by exactly those calls, which the
cookbook's reconciliation query finds (aggregate against ``FINAL``, per month) and ``rebuild``
removes (the month recomputed from ``FINAL``). Quantiles are t-digest estimates,
never exact (200,000 skewed samples merged from 4,000 per-minute states came within 0.02% of the
exact p50, p95 and p99: one check, not a bound); sums are exact (Decimal money, integer tokens).

An install whose ``usage_events`` predates the aggregates gets them filled once, from ``FINAL``,
when they are created (``backfill``): the accountant creates the schema before its ingest starts,
so no row arrives between the view's creation and the backfill from that accountant.
"""

from __future__ import annotations

USAGE_MINUTE = "usage_minute"
USAGE_MINUTE_VIEW = "usage_minute_mv"
TASK_USAGE = "task_usage"
TASK_USAGE_VIEW = "task_usage_mv"
AGGREGATES = (USAGE_MINUTE, TASK_USAGE)

# The quantile levels kept in the states; a query must merge with the same levels.
LEVELS = "0.5, 0.95, 0.99"
# Outcomes of calls a model ran (latency is measured only for them: a cache hit or a refusal took no model time).
RAN = "('ok', 'error', 'timeout', 'cancelled')"

MINUTE_SELECT = f"""
    SELECT
        toStartOfMinute(e.time) AS minute,
        e.tenant AS tenant,
        e.model AS model,
        e.tier AS tier,
        e.outcome AS outcome,
        count() AS calls,
        sum(e.input_tokens) AS input_tokens,
        sum(e.cached_input_tokens) AS cached_input_tokens,
        sum(e.output_tokens) AS output_tokens,
        sum(e.cost_usd) AS cost_usd,
        quantilesTDigestState({LEVELS})(e.latency_ms) AS latency_ms,
        -- 0: not streamed, no first token measured
        quantilesTDigestIfState({LEVELS})(e.ttft_ms, e.ttft_ms > 0) AS ttft_ms
    FROM {{source}}
    GROUP BY minute, tenant, model, tier, outcome
"""

TASK_SELECT = """
    SELECT
        e.task_id AS task_id,
        any(e.tenant) AS tenant,
        count() AS calls,
        sum(e.input_tokens) AS input_tokens,
        sum(e.cached_input_tokens) AS cached_input_tokens,
        sum(e.output_tokens) AS output_tokens,
        sum(e.cost_usd) AS cost_usd,
        max(e.input_tokens + e.output_tokens) AS largest_call_tokens,
        min(e.time) AS first_call,
        max(e.time) AS last_call
    FROM {source}
    GROUP BY task_id
"""


def statements(db: str, usage_events: str) -> list[str]:
    """CREATE statements of the aggregate tables and their views, in ``db`` (quoted), fed by ``usage_events``."""
    source = f"{db}.{usage_events} AS e"
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{USAGE_MINUTE} (
            minute DateTime('UTC'),
            tenant LowCardinality(String),
            model LowCardinality(String),
            tier LowCardinality(String),
            outcome LowCardinality(String),
            calls SimpleAggregateFunction(sum, UInt64),
            input_tokens SimpleAggregateFunction(sum, UInt64),
            cached_input_tokens SimpleAggregateFunction(sum, UInt64),
            output_tokens SimpleAggregateFunction(sum, UInt64),
            cost_usd SimpleAggregateFunction(sum, Decimal(38, 12)),
            latency_ms AggregateFunction(quantilesTDigest({LEVELS}), Float64),
            ttft_ms AggregateFunction(quantilesTDigestIf({LEVELS}), Float64, UInt8)
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(minute)
        ORDER BY (minute, tenant, model, tier, outcome)
        """,
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{USAGE_MINUTE_VIEW} TO {db}.{USAGE_MINUTE} AS "
        + MINUTE_SELECT.format(source=source),
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{TASK_USAGE} (
            task_id String,
            tenant SimpleAggregateFunction(any, LowCardinality(String)),
            calls SimpleAggregateFunction(sum, UInt64),
            input_tokens SimpleAggregateFunction(sum, UInt64),
            cached_input_tokens SimpleAggregateFunction(sum, UInt64),
            output_tokens SimpleAggregateFunction(sum, UInt64),
            cost_usd SimpleAggregateFunction(sum, Decimal(38, 12)),
            largest_call_tokens SimpleAggregateFunction(max, UInt64),
            first_call SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
            last_call SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
        )
        ENGINE = AggregatingMergeTree
        ORDER BY task_id
        """,
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{TASK_USAGE_VIEW} TO {db}.{TASK_USAGE} AS "
        + TASK_SELECT.format(source=source),
    ]


def backfill(db: str, usage_events: str, created: set[str]) -> list[str]:
    """INSERTs filling the aggregates in ``created`` (just created, so empty) from ``usage_events FINAL``."""
    source = f"{db}.{usage_events} AS e FINAL"
    selects = {USAGE_MINUTE: MINUTE_SELECT, TASK_USAGE: TASK_SELECT}
    return [
        f"INSERT INTO {db}.{table} " + selects[table].format(source=source) for table in AGGREGATES if table in created
    ]


def rebuild(database: str, month: int) -> list[str]:
    """Statements recomputing from ``usage_events FINAL`` what the aggregates hold of ``month`` (YYYYMM):
    ``usage_minute``'s partition, and ``task_usage``'s rows of every task with a call in that month. The
    repair after the reconciliation query (docs/analytics.md) found a call counted twice. Run them in
    order with ingest paused: a row inserted between a delete and its insert would be left out."""
    from services.accountant.ddl import USAGE_EVENTS, quote_identifier  # ddl imports this module

    db, m = quote_identifier(database), int(month)
    tasks = f"(SELECT DISTINCT task_id FROM {db}.{USAGE_EVENTS} WHERE toYYYYMM(time) = {m})"
    month_calls = f"(SELECT * FROM {db}.{USAGE_EVENTS} FINAL WHERE toYYYYMM(time) = {m}) AS e"
    task_calls = f"(SELECT * FROM {db}.{USAGE_EVENTS} FINAL WHERE task_id IN {tasks}) AS e"
    return [
        f"ALTER TABLE {db}.{USAGE_MINUTE} DROP PARTITION {m}",
        f"INSERT INTO {db}.{USAGE_MINUTE} " + MINUTE_SELECT.format(source=month_calls),
        f"DELETE FROM {db}.{TASK_USAGE} WHERE task_id IN {tasks}",
        f"INSERT INTO {db}.{TASK_USAGE} " + TASK_SELECT.format(source=task_calls),
    ]
