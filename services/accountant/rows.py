"""Each ingested message as a ClickHouse row: one ``Sink`` per table (its message type, columns, key and
row builder). Values a column cannot hold (money past Decimal(18, 12), a time outside DateTime64(3))
raise, so the message is dead-lettered rather than stored wrong."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import msgspec

from schemas.messages import TERMINAL_EVENTS, Artifact, BudgetUpdate, Feedback, KillSwitch, TaskEvent, UsageEvent
from services.accountant import ddl

M = TypeVar("M", bound=msgspec.Struct)
Row = tuple[Any, ...]

PICODOLLAR = Decimal("1e-12")  # the scale of the Decimal(18, 12) money columns
MAX_USD = Decimal("1e6")  # Decimal(18, 12) holds less than a million per row
MAX_TIME_MS = 10_000_000_000_000  # year 2286, inside DateTime64(3)'s range


def usd(value: float) -> Decimal:
    """A float amount as the exact decimal it was written as (``repr``), at picodollar scale."""
    if not math.isfinite(value):
        raise ValueError(f"cost {value!r} is not a finite number")
    amount = Decimal(repr(value))
    if abs(amount) >= MAX_USD:
        raise ValueError(f"cost {value!r} is out of range")
    return amount.quantize(PICODOLLAR)


def utc(time_ms: int) -> datetime:
    if not 0 <= time_ms < MAX_TIME_MS:
        raise ValueError(f"time {time_ms} ms is out of range")
    return datetime.fromtimestamp(time_ms / 1000, tz=UTC)


def count(value: int, name: str, bits: int) -> int:
    """A non-negative integer that fits an unsigned column of ``bits`` bits."""
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name} {value} is out of range")
    return value


@dataclass(frozen=True)
class Sink(Generic[M]):
    """How messages of one type become rows of one table."""

    table: str
    message_type: type[M]
    columns: tuple[str, ...]
    # The table's ORDER BY key; the ingest looks its first column up with IN.
    key: tuple[str, ...]
    # None: a valid message that does not belong in the table (acked, not stored).
    to_row: Callable[[M], Row | None]

    @functools.cached_property
    def key_of(self) -> Callable[[Row], tuple[Any, ...]]:
        """The function from a row to its key (looked up once per row, so the positions are
        found once per sink)."""
        positions = [self.columns.index(column) for column in self.key]
        if len(positions) == 1:
            (position,) = positions
            return lambda row: (row[position],)
        return operator.itemgetter(*positions)


def usage_row(e: UsageEvent) -> Row:
    return (
        e.event_id,
        utc(e.time_ms),
        e.tenant,
        e.task_id,
        e.step_id,
        e.call_id,
        e.service,
        e.tier,
        e.provider,
        e.model,
        e.requested_model,
        count(e.input_tokens, "input_tokens", 64),
        count(e.cached_input_tokens, "cached_input_tokens", 64),
        count(e.output_tokens, "output_tokens", 64),
        usd(e.cost_usd),
        e.latency_ms,
        e.outcome,
        e.usage_source,
        e.hardware_profile,
        e.spilled_from,
        e.key_id,
        e.agent,
        e.ttft_ms,
    )


def task_row(e: TaskEvent) -> Row | None:
    # Only a task's end is an accounting fact; the planner's progress events stay in JetStream.
    if e.kind not in TERMINAL_EVENTS:
        return None
    return (
        e.task_id,
        e.kind,
        utc(e.time_ms),
        e.tenant,
        e.workflow,
        usd(e.cost_usd),
        count(e.calls, "calls", 32),
        e.detail,
        e.artifact.id if e.artifact else "",
        e.artifact.type if e.artifact else "",
        e.agent,
    )


def artifact_row(a: Artifact) -> Row:
    return (
        a.id,
        a.type,
        count(a.schema_version, "schema_version", 16),
        a.task_id,
        a.step_id,
        a.calls,
        a.parents,
        usd(a.cost_usd),
        utc(a.created_ms),
    )


def feedback_row(f: Feedback) -> Row:
    if not (f.call_id or f.task_id):
        raise ValueError("feedback names neither a call_id nor a task_id")
    return (f.feedback_id, utc(f.time_ms), f.tenant, f.call_id, f.task_id, f.score, f.source, f.tag, f.comment)


def kill_row(k: KillSwitch) -> Row:
    # A switch event has no id of its own; its content is one (the same write redelivered is the
    # same fact, and two writers never put the same scope, state and millisecond apart).
    event_id = f"{k.scope}:{k.key}:{int(k.tripped)}:{k.time_ms}"
    return (event_id, utc(k.time_ms), k.scope, k.key, k.tripped, k.reason, k.by)


def budget_change_row(b: BudgetUpdate) -> Row:
    # The change's content is its id: the same record redelivered is the same fact.
    change_id = f"{b.scope}:{b.key}:{b.by}:{b.time_ms}"
    day = usd(b.day_usd) if b.day_usd is not None else None
    month = usd(b.month_usd) if b.month_usd is not None else None
    return (change_id, utc(b.time_ms), b.scope, b.key, day, month, list(b.unset), b.by)


USAGE = Sink(
    table=ddl.USAGE_EVENTS,
    message_type=UsageEvent,
    columns=(
        "event_id",
        "time",
        "tenant",
        "task_id",
        "step_id",
        "call_id",
        "service",
        "tier",
        "provider",
        "model",
        "requested_model",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "cost_usd",
        "latency_ms",
        "outcome",
        "usage_source",
        "hardware_profile",
        "spilled_from",
        "key_id",
        "agent",
        "ttft_ms",
    ),
    key=("event_id",),
    to_row=usage_row,
)
TASKS = Sink(
    table=ddl.TASK_EVENTS,
    message_type=TaskEvent,
    columns=(
        "task_id",
        "kind",
        "time",
        "tenant",
        "workflow",
        "cost_usd",
        "calls",
        "detail",
        "artifact_id",
        "artifact_type",
        "agent",
    ),
    key=("task_id", "kind"),
    to_row=task_row,
)
ARTIFACTS = Sink(
    table=ddl.ARTIFACTS,
    message_type=Artifact,
    columns=("id", "type", "schema_version", "task_id", "step_id", "calls", "parents", "cost_usd", "created"),
    key=("id",),
    to_row=artifact_row,
)

KILLS = Sink(
    table=ddl.KILL_EVENTS,
    message_type=KillSwitch,
    columns=("event_id", "time", "scope", "key", "tripped", "reason", "by"),
    key=("event_id",),
    to_row=kill_row,
)
BUDGET_CHANGES = Sink(
    table=ddl.BUDGET_CHANGES,
    message_type=BudgetUpdate,
    columns=("change_id", "time", "scope", "key", "day_usd", "month_usd", "unset", "by"),
    key=("change_id",),
    to_row=budget_change_row,
)
FEEDBACK = Sink(
    table=ddl.FEEDBACK,
    message_type=Feedback,
    columns=("feedback_id", "time", "tenant", "call_id", "task_id", "score", "source", "tag", "comment"),
    key=("feedback_id",),
    to_row=feedback_row,
)
