"""The accountant's ClickHouse schema: four ingest tables and the analysts' views.

Every statement is idempotent (``IF NOT EXISTS``) and names its database explicitly, so the same
DDL serves ``frugalmesh up``, a production cluster and one database per test.

Exactness: the ingest drops keys already stored before each insert, so a redelivered message
never adds a row. ReplacingMergeTree on the same key is the safety net for the one race the
ingest cannot see (two accountants inserting the same key at once); its merges are eventual,
so every view reads ``FINAL``. That is why the views are plain views and not materialized
ones: a SummingMergeTree fed on insert would count a raced duplicate for ever, whereas a view
over ``FINAL`` is always exact.
The per-minute and per-task aggregates the report reads are materialized views all the same (a
view over ``FINAL`` of ten million rows takes seconds): services/accountant/aggregates.py says
where they are exact and how a raced duplicate is found and repaired.

Money is ``Decimal(18, 12)`` (up to $999,999.999999999999 per row, picodollar resolution) so
sums are exact, unlike float sums whose result depends on the order of addition.
"""

from __future__ import annotations

from services.accountant import aggregates

USAGE_EVENTS = "usage_events"
TASK_EVENTS = "task_events"
ARTIFACTS = "artifacts"
KILL_EVENTS = "kill_events"
ALERTS = "alerts"  # spend alerts that fired (services/accountant/alerts.py)
FEEDBACK = "feedback"  # verdicts on calls' answers (schemas.messages.Feedback)
BUDGET_CHANGES = "budget_changes"  # every cap an operator changed, by whom and when

SPEND_DAILY = "spend_daily"
COMPLETED_ARTIFACT_COST = "completed_artifact_cost"
CACHE_HIT_DAILY = "cache_hit_daily"
TASK_TOKENS = "task_tokens"
KEY_SPEND_DAILY = "key_spend_daily"
CALL_FEEDBACK = "call_feedback"

TABLES = (USAGE_EVENTS, TASK_EVENTS, ARTIFACTS, KILL_EVENTS, ALERTS, FEEDBACK, BUDGET_CHANGES)
VIEWS = (SPEND_DAILY, COMPLETED_ARTIFACT_COST, CACHE_HIT_DAILY, TASK_TOKENS, KEY_SPEND_DAILY, CALL_FEEDBACK)

# Columns a table gained after its first release, in the order CREATE TABLE lists them, last; all
# LowCardinality(String) DEFAULT ''. Each is added AFTER the one before it (the first after the
# table's last original column), so an upgraded table and a new one have the same column order (one
# insert column list serves both) whichever of them an old table already had.
ADDED_USAGE_COLUMNS = ("hardware_profile", "spilled_from", "key_id", "agent")
FIRST_ADDED_AFTER = "usage_source"
ADDED_TASK_COLUMNS = ("agent",)
FIRST_TASK_ADDED_AFTER = "artifact_type"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def added_columns(table: str, first_after: str, columns: tuple[str, ...]) -> list[str]:
    """ALTER statements giving ``table`` (a qualified name) created before ``columns`` existed each of
    them in place (CREATE ... IF NOT EXISTS leaves an existing table as it is); its old rows read as ''."""
    return [
        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} LowCardinality(String) DEFAULT '' AFTER {after}"
        for after, column in zip((first_after, *columns), columns, strict=False)
    ]


def statements(database: str) -> list[str]:
    """CREATE (and ALTER ... ADD COLUMN) statements for every table and view, in dependency order,
    inside ``database``."""
    db = quote_identifier(database)
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{USAGE_EVENTS} (
            event_id String,
            time DateTime64(3, 'UTC'),
            tenant LowCardinality(String),
            task_id String,
            step_id String,
            call_id String,
            service LowCardinality(String),
            tier LowCardinality(String),
            provider LowCardinality(String),
            model LowCardinality(String),
            requested_model LowCardinality(String),
            input_tokens UInt64,
            cached_input_tokens UInt64,
            output_tokens UInt64,
            cost_usd Decimal(18, 12),
            latency_ms Float64,
            outcome LowCardinality(String),
            usage_source LowCardinality(String),
            hardware_profile LowCardinality(String) DEFAULT '',
            spilled_from LowCardinality(String) DEFAULT '',
            key_id LowCardinality(String) DEFAULT '',
            agent LowCardinality(String) DEFAULT '',
            ttft_ms Float64 DEFAULT 0
        )
        ENGINE = ReplacingMergeTree
        -- an event's time never changes, so a duplicate always lands in the same partition
        PARTITION BY toYYYYMM(time)
        ORDER BY event_id
        """,
        *added_columns(f"{db}.{USAGE_EVENTS}", FIRST_ADDED_AFTER, ADDED_USAGE_COLUMNS),
        # Time to first token (UsageEvent.ttft_ms), after every string column added before it.
        f"ALTER TABLE {db}.{USAGE_EVENTS} ADD COLUMN IF NOT EXISTS ttft_ms Float64 DEFAULT 0 "
        f"AFTER {ADDED_USAGE_COLUMNS[-1]}",
        # The report's call trees look tasks up by id; the table is ordered by event id.
        f"ALTER TABLE {db}.{USAGE_EVENTS} ADD INDEX IF NOT EXISTS task_id_bloom task_id TYPE bloom_filter "
        "GRANULARITY 1",
        *aggregates.statements(db, USAGE_EVENTS),
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{TASK_EVENTS} (
            task_id String,
            kind LowCardinality(String),
            time DateTime64(3, 'UTC'),
            tenant LowCardinality(String),
            workflow LowCardinality(String),
            cost_usd Decimal(18, 12),
            calls UInt32,
            detail String,
            artifact_id String,
            artifact_type LowCardinality(String),
            agent LowCardinality(String) DEFAULT ''
        )
        ENGINE = ReplacingMergeTree
        ORDER BY (task_id, kind)
        """,
        *added_columns(f"{db}.{TASK_EVENTS}", FIRST_TASK_ADDED_AFTER, ADDED_TASK_COLUMNS),
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{ARTIFACTS} (
            id String,
            type LowCardinality(String),
            schema_version UInt16,
            task_id String,
            step_id String,
            calls Array(String),
            parents Array(String),
            cost_usd Decimal(18, 12),
            created DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree
        ORDER BY id
        """,
        # Every trip and clear of the kill switch (mesh.control.kill), whoever wrote it.
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{KILL_EVENTS} (
            event_id String,
            time DateTime64(3, 'UTC'),
            scope LowCardinality(String),
            key String,
            tripped Bool,
            reason String,
            by String
        )
        ENGINE = ReplacingMergeTree
        ORDER BY event_id
        """,
        # Every spend alert that fired (deploy/alerts.toml), once per rule, scope key and window.
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{ALERTS} (
            alert_id String,
            time DateTime64(3, 'UTC'),
            tenant LowCardinality(String),
            rule LowCardinality(String),
            kind LowCardinality(String),
            scope LowCardinality(String),
            key String,
            window LowCardinality(String),
            window_start DateTime64(3, 'UTC'),
            window_end DateTime64(3, 'UTC'),
            value_usd Decimal(18, 12),
            threshold_usd Decimal(18, 12),
            detail String
        )
        ENGINE = ReplacingMergeTree
        ORDER BY alert_id
        """,
        # Every verdict on an answer (mesh.feedback): a new table, so an existing install gains it
        # on the accountant's next start (every statement here runs then).
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{FEEDBACK} (
            feedback_id String,
            time DateTime64(3, 'UTC'),
            tenant LowCardinality(String),
            call_id String,
            task_id String,
            score Float64,
            source LowCardinality(String),
            tag LowCardinality(String),
            comment String
        )
        ENGINE = ReplacingMergeTree
        ORDER BY feedback_id
        """,
        # Every cap change an operator made (mesh.operator.<name>.budget): who, when, the new caps.
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{BUDGET_CHANGES} (
            change_id String,
            time DateTime64(3, 'UTC'),
            scope LowCardinality(String),
            key String,
            day_usd Nullable(Decimal(18, 12)),
            month_usd Nullable(Decimal(18, 12)),
            unset Array(LowCardinality(String)),
            by String
        )
        ENGINE = ReplacingMergeTree
        ORDER BY change_id
        """,
        # Spend per UTC day, tenant and model.
        f"""
        CREATE VIEW IF NOT EXISTS {db}.{SPEND_DAILY} AS
        SELECT
            toDate(time) AS day,
            tenant,
            model,
            tier,
            count() AS calls,
            sum(input_tokens) AS input_tokens,
            sum(cached_input_tokens) AS cached_input_tokens,
            sum(output_tokens) AS output_tokens,
            sum(cost_usd) AS cost_usd
        FROM {db}.{USAGE_EVENTS} FINAL
        GROUP BY day, tenant, model, tier
        """,
        # One row per task that ended "done": its final artifact and what the task cost, both as
        # metered (usage rows) and as the planner reported it.
        f"""
        CREATE VIEW IF NOT EXISTS {db}.{COMPLETED_ARTIFACT_COST} AS
        SELECT
            t.task_id AS task_id,
            t.tenant AS tenant,
            t.workflow AS workflow,
            t.time AS completed,
            t.artifact_id AS artifact_id,
            t.artifact_type AS artifact_type,
            t.calls AS reported_calls,
            t.cost_usd AS reported_cost_usd,
            u.calls AS metered_calls,
            u.cost_usd AS metered_cost_usd
        FROM (SELECT * FROM {db}.{TASK_EVENTS} FINAL WHERE kind = 'done') AS t
        LEFT JOIN (
            SELECT task_id, count() AS calls, sum(cost_usd) AS cost_usd
            FROM {db}.{USAGE_EVENTS} FINAL
            GROUP BY task_id
        ) AS u ON u.task_id = t.task_id
        """,
        # Two caches: the mesh's exact-match response cache (outcome cache_hit, a whole call
        # saved) and the provider's prompt cache (cached input tokens, billed at a discount).
        f"""
        CREATE VIEW IF NOT EXISTS {db}.{CACHE_HIT_DAILY} AS
        SELECT
            toDate(time) AS day,
            tenant,
            count() AS calls,
            countIf(outcome = 'cache_hit') AS cache_hits,
            cache_hits / calls AS cache_hit_share,
            sum(e.input_tokens) AS input_tokens,
            sum(e.cached_input_tokens) AS cached_input_tokens,
            if(input_tokens = 0, 0, cached_input_tokens / input_tokens) AS cached_input_share
        FROM {db}.{USAGE_EVENTS} AS e FINAL
        GROUP BY day, tenant
        """,
        # Tokens per task, exact (over FINAL; the task_usage aggregate keeps the same sums, fast): the
        # aggregate's own SELECT. largest_call_tokens is the single-call baseline (the biggest one call
        # of the task), so total_tokens / largest_call_tokens is the task's multi-call overhead.
        f"""
        CREATE VIEW IF NOT EXISTS {db}.{TASK_TOKENS} AS
        SELECT *, input_tokens + output_tokens AS total_tokens
        FROM ({aggregates.TASK_SELECT.format(source=f"{db}.{USAGE_EVENTS} AS e FINAL")})
        """,
        # Each verdict beside the call it judges: the call's model, tier and cost (a verdict naming
        # only a task joins each of the task's calls), and its tag (the verdict's, else the task's
        # workflow). `frugalmesh router train --from-clickhouse` reads its labels from here.
        f"""
        CREATE VIEW IF NOT EXISTS {db}.{CALL_FEEDBACK} AS
        SELECT
            f.feedback_id AS feedback_id,
            f.time AS time,
            f.tenant AS tenant,
            u.call_id AS call_id,
            u.task_id AS task_id,
            u.step_id AS step_id,
            u.model AS model,
            u.tier AS tier,
            u.cost_usd AS cost_usd,
            f.score AS score,
            f.source AS source,
            if(f.tag != '', f.tag, t.workflow) AS tag,
            f.comment AS comment
        FROM (SELECT * FROM {db}.{FEEDBACK} FINAL) AS f
        INNER JOIN (SELECT * FROM {db}.{USAGE_EVENTS} FINAL WHERE outcome = 'ok') AS u
            ON u.call_id = f.call_id OR (f.call_id = '' AND u.task_id = f.task_id)
        LEFT JOIN (SELECT task_id, any(workflow) AS workflow FROM {db}.{TASK_EVENTS} FINAL GROUP BY task_id) AS t
            ON t.task_id = u.task_id
        """,
        # Spend per UTC day and virtual key (the gateway's callers): what each key cost, beside its
        # caps (`frugalmesh budget show --scope key`). Calls not made with a key are left out.
        f"""
        CREATE VIEW IF NOT EXISTS {db}.{KEY_SPEND_DAILY} AS
        SELECT
            toDate(time) AS day,
            tenant,
            key_id,
            count() AS calls,
            sum(input_tokens) AS input_tokens,
            sum(output_tokens) AS output_tokens,
            sum(cost_usd) AS cost_usd
        FROM {db}.{USAGE_EVENTS} FINAL
        WHERE key_id != ''
        GROUP BY day, tenant, key_id
        """,
    ]
