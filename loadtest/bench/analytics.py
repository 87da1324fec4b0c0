"""Benchmark: every query of `frugalmesh report` on 10 million usage rows, on the aggregates against
the same question asked of the raw rows.

``python -m loadtest.bench.analytics --json``. An embedded ClickHouse on a free port, the
accountant's own DDL (``create_schema``: tables, materialized views), then the rows generated inside
ClickHouse (``INSERT ... SELECT ... FROM numbers()``) into ``usage_events`` and ``task_events``, so
the views fill exactly as they do under ingest. The rows: 30 days ending now, 20 tenants, 40
virtual keys (on 30% of calls), the shipped catalogue's four models at their prices, eight calls a
task, outcomes mostly ok with cache hits, errors, time-outs, refusals and kills.

Each report query runs ``--repeat`` times after one warm-up run, and the best time counts (the
machine is shared: the best run is the query's cost, the others add other people's load). The
reference is the same query text with each aggregate replaced by the view's own SELECT over
``usage_events FINAL`` (what the report would run without the aggregates).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from clickhouse_connect.driver.client import Client

from services.accountant import aggregates
from services.accountant.clickhouse import client, create_schema
from services.analytics.data import ReportWindow, query_parameters
from services.analytics.queries import REPORT, Query
from services.embedded.servers import EmbeddedClickHouse

ROWS = 10_000_000
DAYS = 30
CALLS_PER_TASK = 8
# (model, tier, input, cached input, output USD per million tokens): deploy/models.toml's.
MODELS = (
    ("mixtral-8x7b-local", "local", 0.0286, 0.0286, 0.1429),
    ("smollm2-135m", "local", 0.0704, 0.0704, 0.2322),
    ("mixtral-8x7b", "mid", 0.60, 0.60, 0.60),
    ("gpt-4-1106-preview", "frontier", 10.0, 10.0, 30.0),
)
WORKFLOWS = ("answer", "draft-review", "triage", "debate")


def _pick(values: list[str], index: str) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + f"][{index} + 1]"


def usage_insert(database: str, rows: int, end: datetime) -> str:
    """One INSERT ... SELECT generating ``rows`` usage rows over the ``DAYS`` days before ``end``."""
    step_ms = DAYS * 86_400_000 // rows
    end_ms = int(end.timestamp() * 1000)
    names = [m[0] for m in MODELS]
    tiers = [m[1] for m in MODELS]
    price = {
        column: "[" + ", ".join(str(m[i]) for m in MODELS) + "]" for i, column in enumerate(("in", "cin", "out"), 2)
    }
    return f"""
    INSERT INTO `{database}`.usage_events (event_id, time, tenant, task_id, step_id, call_id, service, tier,
        provider, model, requested_model, input_tokens, cached_input_tokens, output_tokens, cost_usd, latency_ms,
        outcome, usage_source, key_id, agent, ttft_ms)
    SELECT
        concat('bench-', toString(number)) AS event_id,
        fromUnixTimestamp64Milli(toInt64({end_ms} - ({rows} - number) * {step_ms}), 'UTC') AS time,
        concat('tenant-', toString(cityHash64(intDiv(number, {CALLS_PER_TASK})) % 20)) AS tenant,
        concat('task-', toString(intDiv(number, {CALLS_PER_TASK}))) AS task_id,
        concat('s', toString(number % {CALLS_PER_TASK})) AS step_id,
        event_id AS call_id,
        if(m < 2, 'local-inference', 'cloud-inference') AS service,
        {_pick(tiers, "m")} AS tier,
        if(m < 2, 'local', 'cloud') AS provider,
        {_pick(names, "m")} AS model,
        model AS requested_model,
        50 + cityHash64(number, 1) % 2000 AS input_tokens,
        intDiv(input_tokens * (cityHash64(number, 2) % 50), 100) AS cached_input_tokens,
        10 + cityHash64(number, 3) % 500 AS output_tokens,
        if(outcome IN ('cache_hit', 'refused', 'killed'), toDecimal64(0, 12), toDecimal64(
            ((input_tokens - cached_input_tokens) * {price["in"]}[m + 1] + cached_input_tokens * {price["cin"]}[m + 1]
             + output_tokens * {price["out"]}[m + 1]) / 1e6, 12)) AS cost_usd,
        20 + (cityHash64(number, 4) % 1000) * (m + 1) * 1.5 AS latency_ms,
        multiIf(r < 880, 'ok', r < 940, 'cache_hit', r < 960, 'error', r < 970, 'timeout', r < 980, 'refused',
                r < 990, 'killed', 'cancelled') AS outcome,
        'provider' AS usage_source,
        if(cityHash64(number, 6) % 10 < 3, concat('fmk_', toString(cityHash64(number, 7) % 40)), '') AS key_id,
        if(number % 10 = 0, 'debate', '') AS agent,
        if(m >= 2, 100 + cityHash64(number, 8) % 400, 0) AS ttft_ms
    FROM (
        SELECT number, cityHash64(number, 9) % 4 AS m, cityHash64(number, 5) % 1000 AS r
        FROM numbers({rows})
    )"""


def task_insert(database: str, rows: int, end: datetime) -> str:
    """One terminal task row per ``CALLS_PER_TASK`` usage rows, ended at its last call."""
    tasks = rows // CALLS_PER_TASK
    step_ms = DAYS * 86_400_000 // rows
    end_ms = int(end.timestamp() * 1000)
    workflows = list(WORKFLOWS)
    types = ["answer", "answer", "ticket_label", "answer"]
    return f"""
    INSERT INTO `{database}`.task_events (task_id, kind, time, tenant, workflow, cost_usd, calls, detail,
        artifact_id, artifact_type)
    SELECT
        concat('task-', toString(number)) AS task_id,
        multiIf(r < 85, 'done', r < 95, 'failed', r < 98, 'partial', 'killed') AS kind,
        fromUnixTimestamp64Milli(toInt64({end_ms} - ({rows} - (number + 1) * {CALLS_PER_TASK}) * {step_ms}), 'UTC'),
        concat('tenant-', toString(cityHash64(number) % 20)) AS tenant,
        {_pick(workflows, "w")} AS workflow,
        toDecimal64((cityHash64(number, 1) % 100000) / 1e6, 12) AS cost_usd,
        {CALLS_PER_TASK} AS calls,
        multiIf(kind = 'failed', 'timeout: the deadline passed', kind = 'partial', 'budget spent', '') AS detail,
        if(kind = 'done', hex(cityHash64(number, 2)), '') AS artifact_id,
        if(kind = 'done', {_pick(types, "w")}, '') AS artifact_type
    FROM (SELECT number, cityHash64(number, 3) % 4 AS w, cityHash64(number, 4) % 100 AS r FROM numbers({tasks}))"""


def raw_reference(query: Query) -> str:
    """``query`` asked of the raw rows: each aggregate replaced by its view's SELECT over ``usage_events FINAL``."""
    sql = query.sql
    for table, select in (
        (aggregates.USAGE_MINUTE, aggregates.MINUTE_SELECT),
        (aggregates.TASK_USAGE, aggregates.TASK_SELECT),
    ):
        sql = re.sub(rf"\bFROM {table}\b", f"FROM ({select.format(source='usage_events AS e FINAL')})", sql)
    return sql


def best_ms(ch: Client, sql: str, parameters: dict[str, Any], repeat: int) -> float:
    ch.query(sql, parameters=parameters)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        ch.query(sql, parameters=parameters)
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


def run(url: str, database: str, rows: int, repeat: int) -> dict[str, Any]:
    end = datetime.now(UTC)
    create_schema(client(url), database)
    # The report's queries name tables without a database: the client's is the benchmark's.
    ch = client(urlunsplit(urlsplit(url)._replace(path=f"/{database}")))
    started = time.perf_counter()
    ch.command(usage_insert(database, rows, end))
    ch.command(task_insert(database, rows, end))
    generate_s = time.perf_counter() - started
    ch.command(f"OPTIMIZE TABLE `{database}`.usage_events FINAL")
    window = ReportWindow(since=end - timedelta(days=7), until=end, tenant="")
    result: dict[str, Any] = {"usage_rows": rows, "generate_s": round(generate_s, 1)}
    for table in aggregates.AGGREGATES:
        result[f"{table}_rows"] = ch.query(f"SELECT count() FROM `{database}`.{table}").result_rows[0][0]
    tasks = [f"task-{i}" for i in range(rows // CALLS_PER_TASK - 10, rows // CALLS_PER_TASK)]
    parameters = query_parameters(window, bucket_s=3600, frontier=(10.0, 10.0, 30.0), tasks=tasks)
    report_ms = {}
    for query in REPORT:
        report_ms[query.name] = best_ms(ch, query.sql, parameters, repeat)
        result[f"{query.name}_ms"] = round(report_ms[query.name], 1)
        reference = raw_reference(query)
        if reference != query.sql:
            result[f"{query.name}_raw_ms"] = round(best_ms(ch, reference, parameters, repeat), 1)
    result["report_query_max_ms"] = round(max(report_ms.values()), 1)
    result["report_query_total_ms"] = round(sum(report_ms.values()), 1)
    raw = [v for k, v in result.items() if k.endswith("_raw_ms")]
    result["raw_query_max_ms"] = max(raw)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="The report's queries on the aggregates against the raw rows.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", help="A ClickHouse writer URL to use instead of a private embedded server.")
    args = parser.parse_args()
    # Its own database each run: a second run into the same one would count every row twice in the aggregates.
    database = f"bench_analytics_{uuid.uuid4().hex[:8]}"
    if args.url:
        result = run(args.url, database, args.rows, args.repeat)
    else:
        with tempfile.TemporaryDirectory(prefix="frugalmesh-bench-analytics-") as tmp:
            clickhouse = EmbeddedClickHouse(Path(tmp) / "clickhouse", port=0)
            try:
                result = run(clickhouse.start(), database, args.rows, args.repeat)
            finally:
                clickhouse.stop()
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
