"""The SQL behind every figure of `frugalmesh report`, shown under the figure as it ran.

Each query takes ClickHouse's own query parameters (``{since:DateTime64(3)}``), so the text an
analyst copies is the text that ran, and values never enter it as strings. ``{tenant:String}`` is
'' for every tenant. Queries read the aggregates (services/accountant/aggregates.py) where they can
answer: ``usage_minute`` for anything per minute, tenant, model, tier or outcome, ``task_usage`` for
anything per task. Three need raw rows and read them within the window only: the task outcomes and
artifacts (``task_events FINAL``: one row per ended task, about a tenth of the usage rows), a
handful of tasks' calls (``usage_events`` by task id, through its bloom filter) and the spend per
virtual key (``usage_events``, which the per-minute aggregate does not split by key).

Definitions an analyst should know:
- The frontier-only counterfactual prices every call that ran or was answered from the cache (not
  the refused and killed ones: frontier-only would not have made them either) on the cheapest
  frontier model's list price, with the call's own token counts (same tokens, frontier prices: a
  frontier model's tokenizer would count somewhat differently).
- Tokens per task against a single call: a task's tokens against its largest single call, the
  nearest measured stand-in for one call on the same goal (``task_tokens`` defines it the same way).
- Cost per completed artifact: the spend of every task of a workflow that ended (done, partial,
  failed, killed) divided by the artifacts it completed, seed 001's denominator: failures are paid
  for by the successes. The cost of the completed tasks alone is shown beside it.
- A spend anomaly: an hour whose spend, for one tenant or virtual key, lies outside the mean plus or
  minus three standard deviations of that scope's previous 24 hours with spend (at least 6 of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.accountant.aggregates import LEVELS, RAN

TENANT = "({tenant:String} = '' OR tenant = {tenant:String})"
WINDOW = "minute >= {since:DateTime64(3)}"


@dataclass(frozen=True)
class Query:
    """One figure's query: ``sql`` with ClickHouse query parameters."""

    name: str
    sql: str


SPAN = Query(
    "span",
    f"SELECT min(minute), max(minute), sum(calls), sum(cost_usd) FROM usage_minute WHERE {WINDOW} AND {TENANT}",
)

SPEND_OVER_TIME = Query(
    "spend_over_time",
    f"""SELECT
    toStartOfInterval(minute, toIntervalSecond({{bucket_s:UInt32}})) AS bucket,
    tenant, model, tier,
    sum(cost_usd) AS cost_usd
FROM usage_minute
WHERE {WINDOW} AND {TENANT}
GROUP BY bucket, tenant, model, tier
ORDER BY bucket""",
)

SAVINGS = Query(
    "savings",
    f"""SELECT
    toStartOfInterval(minute, toIntervalSecond({{bucket_s:UInt32}})) AS bucket,
    sum(cost_usd) AS actual_usd,
    (sum(input_tokens - cached_input_tokens) * {{frontier_input_usd_per_mtok:Float64}}
     + sum(cached_input_tokens) * {{frontier_cached_input_usd_per_mtok:Float64}}
     + sum(output_tokens) * {{frontier_output_usd_per_mtok:Float64}}) / 1e6 AS frontier_only_usd
FROM usage_minute
WHERE {WINDOW} AND {TENANT} AND outcome NOT IN ('refused', 'killed')
GROUP BY bucket
ORDER BY bucket""",
)

MONTH_TO_DATE = Query(
    "month_to_date",
    f"""SELECT toStartOfHour(minute) AS hour, tenant, sum(cost_usd) AS cost_usd
FROM usage_minute
WHERE minute >= {{month_start:DateTime64(3)}} AND {TENANT}
GROUP BY hour, tenant
ORDER BY hour""",
)

LATENCY = Query(
    "latency",
    f"""SELECT
    model,
    sum(calls) AS calls,
    quantilesTDigestMerge({LEVELS})(latency_ms) AS latency_ms,
    quantilesTDigestIfMerge({LEVELS})(ttft_ms) AS ttft_ms
FROM usage_minute
WHERE {WINDOW} AND {TENANT} AND outcome IN {RAN}
GROUP BY model
ORDER BY model""",
)

CACHE = Query(
    "cache",
    f"""SELECT
    toStartOfInterval(minute, toIntervalSecond({{bucket_s:UInt32}})) AS bucket,
    sumIf(calls, outcome = 'cache_hit') / sum(calls) AS exact_cache_hit_share,
    sumIf(cached_input_tokens, outcome != 'cache_hit')
        / greatest(sumIf(input_tokens, outcome != 'cache_hit'), 1) AS engine_cached_prompt_share
FROM usage_minute
WHERE {WINDOW} AND {TENANT} AND outcome NOT IN ('refused', 'killed')
GROUP BY bucket
ORDER BY bucket""",
)

DEFENCES = Query(
    "defences",
    f"""SELECT 'calls' AS unit,
    multiIf(outcome = 'timeout', '1 time-out', outcome = 'killed', '3 kill switch',
            '3/5 cap or pacing refusal') AS layer,
    sum(calls) AS n
FROM usage_minute
WHERE {WINDOW} AND {TENANT} AND outcome IN ('timeout', 'killed', 'refused')
GROUP BY layer
UNION ALL
SELECT 'tasks' AS unit,
    multiIf(kind = 'killed', '3 kill switch',
            detail LIKE 'layer 2 (anti-loop)%' OR detail LIKE '%repeated%', '2 anti-loop',
            detail LIKE '%timeout%' OR detail LIKE '%deadline%', '1 time-out',
            detail LIKE '%allow_models%', '4 pinning',
            detail LIKE '%budget%' OR detail LIKE '% cap %' OR detail LIKE '%refused%', '3/5 cap or pacing refusal',
            'other failure') AS layer,
    count() AS n
FROM task_events FINAL
WHERE time >= {{since:DateTime64(3)}} AND {TENANT} AND kind IN ('failed', 'partial', 'killed')
GROUP BY layer
ORDER BY unit, layer""",
)

ARTIFACT_COST = Query(
    "artifact_cost",
    f"""SELECT 'workflow' AS by, workflow AS name,
    countIf(kind = 'done') AS completed,
    count() AS tasks,
    sum(cost_usd) / greatest(completed, 1) AS usd_per_completed_artifact,
    sumIf(cost_usd, kind = 'done') / greatest(completed, 1) AS usd_per_completed_task
FROM task_events FINAL
WHERE time >= {{since:DateTime64(3)}} AND {TENANT}
GROUP BY name
UNION ALL
SELECT 'artifact type' AS by, artifact_type AS name,
    count() AS completed,
    count() AS tasks,
    sum(cost_usd) / completed AS usd_per_completed_artifact,
    usd_per_completed_artifact AS usd_per_completed_task
FROM task_events FINAL
WHERE time >= {{since:DateTime64(3)}} AND {TENANT} AND kind = 'done'
GROUP BY name
ORDER BY by DESC, name""",
)

TOKEN_MULTIPLIER = Query(
    "token_multiplier",
    f"""SELECT
    t.workflow AS workflow,
    count() AS tasks,
    avg(u.input_tokens + u.output_tokens) AS tokens_per_task,
    avg(u.largest_call_tokens) AS single_call_tokens,
    tokens_per_task / greatest(single_call_tokens, 1) AS multiplier
FROM (
    SELECT task_id, workflow FROM task_events FINAL
    WHERE time >= {{since:DateTime64(3)}} AND {TENANT} AND kind = 'done'
) AS t
INNER JOIN (
    SELECT task_id, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
        max(largest_call_tokens) AS largest_call_tokens
    FROM task_usage
    WHERE first_call >= {{since:DateTime64(3)}} - INTERVAL 1 DAY AND {TENANT}
    GROUP BY task_id
) AS u ON u.task_id = t.task_id
GROUP BY workflow
ORDER BY workflow""",
)

COSTLIEST_TASKS = Query(
    "costliest_tasks",
    f"""SELECT task_id, any(tenant) AS task_tenant, sum(calls) AS calls, sum(cost_usd) AS cost_usd,
    min(first_call) AS started
FROM task_usage
WHERE first_call >= {{since:DateTime64(3)}} AND {TENANT}
GROUP BY task_id
ORDER BY cost_usd DESC, task_id
LIMIT 10""",
)

CALL_TREES = Query(
    "call_trees",
    """SELECT task_id, step_id, call_id, model, tier, outcome,
    input_tokens, output_tokens, cost_usd, latency_ms, time
FROM usage_events
WHERE task_id IN {tasks:Array(String)}
ORDER BY task_id, time, call_id
-- one row per call (a duplicate may wait for a merge); cheaper than FINAL, which skips the bloom filter
LIMIT 1 BY event_id""",
)

TASK_WORKFLOWS = Query(
    "task_workflows",
    """SELECT task_id, workflow, kind FROM task_events FINAL WHERE task_id IN {tasks:Array(String)}""",
)

_BAND = """
    avg(cost_usd) OVER trailing AS band_mean,
    stddevPop(cost_usd) OVER trailing AS band_sd,
    count() OVER trailing AS band_hours
"""

ANOMALIES = Query(
    "anomalies",
    f"""SELECT scope, key, hour, cost_usd, band_mean, band_sd,
    abs(cost_usd - band_mean) > 3 * band_sd AND band_hours >= 6 AS anomaly
FROM (
    SELECT 'tenant' AS scope, tenant AS key, hour, cost_usd, {_BAND}
    FROM (
        SELECT toStartOfHour(minute) AS hour, tenant, toFloat64(sum(cost_usd)) AS cost_usd
        FROM usage_minute
        WHERE minute >= {{since:DateTime64(3)}} - INTERVAL 1 DAY AND {TENANT}
        GROUP BY hour, tenant
    )
    WINDOW trailing AS (PARTITION BY tenant ORDER BY hour ROWS BETWEEN 24 PRECEDING AND 1 PRECEDING)
    UNION ALL
    SELECT 'key' AS scope, key_id AS key, hour, cost_usd, {_BAND}
    FROM (
        SELECT toStartOfHour(time) AS hour, key_id, toFloat64(sum(cost_usd)) AS cost_usd
        FROM usage_events
        WHERE time >= {{since:DateTime64(3)}} - INTERVAL 1 DAY AND {TENANT} AND key_id != ''
        GROUP BY hour, key_id
    )
    WINDOW trailing AS (PARTITION BY key_id ORDER BY hour ROWS BETWEEN 24 PRECEDING AND 1 PRECEDING)
)
WHERE hour >= {{since:DateTime64(3)}}
ORDER BY scope DESC, key, hour""",
)

# Every query the report runs, in the order its figures appear.
REPORT = (
    SPAN,
    SPEND_OVER_TIME,
    SAVINGS,
    MONTH_TO_DATE,
    LATENCY,
    CACHE,
    DEFENCES,
    ARTIFACT_COST,
    TOKEN_MULTIPLIER,
    COSTLIEST_TASKS,
    CALL_TREES,
    TASK_WORKFLOWS,
    ANOMALIES,
)
