"""What the alert rules read: metered spend per scope value, from ClickHouse ``usage_events``.

One query per rule and evaluation, grouped by the rule's scope, reading ``FINAL`` like the analysts'
views (a row raced in twice by two accountants counts once). ``workflow`` is not a usage column: a
call's workflow is its task's, known from ``task_events`` once the task ended, so a workflow's spend
counts its tasks' calls only from then on (a task still running is watched by the tenant, key or
agent rules). Empty scope values (calls made without a key, not by an agent) are left out: they are
no key's or agent's spend.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from services.accountant import ddl
from services.accountant.alert_rules import AlertRule

# The usage_events column of each scope (global and workflow are not columns).
SCOPE_COLUMNS = {
    "tenant": "tenant",
    "key": "key_id",
    "agent": "agent",
    "model": "model",
    "tier": "tier",
    "provider": "provider",
}


@dataclass(frozen=True)
class ScopeSpend:
    """Spend of one scope value in one span of time, and up to two of the tenants it came from."""

    key: str
    usd: float
    tenants: tuple[str, ...]
    # The start of its hour (ms), for the hourly series of anomaly rules; 0 otherwise.
    hour_ms: int = 0


class SpendQueries:
    def __init__(self, ch: Client, database: str) -> None:
        self.ch = ch
        self.db = ddl.quote_identifier(database)

    def spend(self, rule: AlertRule, start_ms: int, end_ms: int, keys: list[str] | None = None) -> list[ScopeSpend]:
        """Spend of each value of the rule's scope in [start_ms, end_ms); only ``keys`` when given."""
        return self._query(rule, start_ms, end_ms, keys, hourly=False)

    def hourly(self, rule: AlertRule, start_ms: int, end_ms: int) -> list[ScopeSpend]:
        """Spend of each value of the rule's scope per UTC hour of [start_ms, end_ms) (hours without spend absent)."""
        return self._query(rule, start_ms, end_ms, None, hourly=True)

    def _query(
        self, rule: AlertRule, start_ms: int, end_ms: int, keys: list[str] | None, *, hourly: bool
    ) -> list[ScopeSpend]:
        source, key_expr = self._source(rule.scope)
        where = [
            "u.time >= fromUnixTimestamp64Milli({start:Int64}, 'UTC')",
            "u.time < fromUnixTimestamp64Milli({end:Int64}, 'UTC')",
        ]
        parameters: dict[str, object] = {"start": start_ms, "end": end_ms}
        if rule.scope != "global":
            where.append(f"{key_expr} != ''")
        if rule.key != "*":
            keys = [rule.key] if keys is None else [k for k in keys if k == rule.key]
        if keys is not None:
            where.append(f"{key_expr} IN {{keys:Array(String)}}")
            parameters["keys"] = keys
        if rule.tenant:
            where.append("u.tenant = {tenant:String}")
            parameters["tenant"] = rule.tenant
        hour = "toInt64(toUnixTimestamp(toStartOfHour(u.time))) * 1000" if hourly else "toInt64(0)"
        rows = self.ch.query(
            f"SELECT {key_expr} AS scope_key, {hour} AS hour_ms, sum(u.cost_usd) AS usd, "
            f"groupUniqArray(2)(u.tenant) AS tenants FROM {source} WHERE {' AND '.join(where)} "
            "GROUP BY scope_key, hour_ms ORDER BY scope_key, hour_ms",
            parameters=parameters,
        ).result_rows
        return [ScopeSpend(key, _usd(usd), tuple(sorted(tenants)), hour_ms) for key, hour_ms, usd, tenants in rows]

    def _source(self, scope: str) -> tuple[str, str]:
        """The FROM clause and the scope value's expression."""
        usage = f"{self.db}.{ddl.USAGE_EVENTS} AS u FINAL"
        if scope == "global":
            return usage, "'*'"
        if scope == "workflow":
            # A task id is unique only within its tenant, so the join is on both.
            tasks = (
                f"SELECT tenant, task_id, any(workflow) AS workflow FROM {self.db}.{ddl.TASK_EVENTS} FINAL "
                "GROUP BY tenant, task_id"
            )
            return f"{usage} INNER JOIN ({tasks}) AS t ON u.tenant = t.tenant AND u.task_id = t.task_id", "t.workflow"
        return usage, f"u.{SCOPE_COLUMNS[scope]}"


def _usd(value: Decimal | float) -> float:
    return float(value)
