"""Batched, exactly-once ingest of JetStream messages into ClickHouse tables.

A batch (up to N messages or a short wait, whichever first) becomes one INSERT. Exactness comes
from here, not from the table engine: duplicates inside the batch are dropped, and so are the
keys of redelivered messages that are already stored, with one SELECT before the insert.
Messages are acked only after the insert succeeded; a failed insert naks the whole batch with a
delay, so JetStream redelivers it and the key check makes the retry harmless.

Only redelivered messages are looked up because only they can already be stored: a row is
inserted before its message is acked, so a stored row whose message comes again comes as a
redelivery (an insert that failed, or succeeded just before a crash, before the ack). A producer's
retry of the same event is the same Nats-Msg-Id, which the stream drops within its duplicate
window (600 s). Past that window a retried event would be a first delivery of a new message and
be stored twice; the tables are ReplacingMergeTree on the key and every view reads FINAL, so it
still counts once. Looking up every key instead is a SELECT whose cost grows with the table
(measured in docs/benchmarks.md, "Accountant ingest").

A message that cannot become a row (malformed, or a value the column cannot hold) is
dead-lettered and acked at once: it would fail every retry and block the stream behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import msgspec
from clickhouse_connect.driver.client import Client
from nats.aio.msg import Msg

from schemas.messages import TERMINAL_EVENTS, Artifact, KillSwitch, TaskEvent, UsageEvent
from services.accountant import ddl
from services.accountant.clickhouse import client, create_schema
from services.runtime.bus import Bus
from services.runtime.pull import BatchPull

M = TypeVar("M", bound=msgspec.Struct)
Row = tuple[Any, ...]

PICODOLLAR = Decimal("1e-12")  # the scale of the Decimal(18, 12) money columns
MAX_USD = Decimal("1e6")  # Decimal(18, 12) holds less than a million per row
MAX_TIME_MS = 10_000_000_000_000  # year 2286, inside DateTime64(3)'s range
SELECT_KEYS = 2000  # keys per duplicate-check SELECT


def usd(value: float) -> Decimal:
    """A float amount as the exact decimal it was written as (``repr``), at picodollar scale."""
    if not math.isfinite(value):
        raise ValueError(f"cost {value!r} is not a finite number")
    amount = Decimal(repr(value))
    if abs(amount) >= MAX_USD:
        raise ValueError(f"cost {value!r} is out of range")
    return amount.quantize(PICODOLLAR)


def delivery_count(reply: str) -> int:
    """How many times a JetStream message has been delivered, read from its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>...``, or with ``<domain>.<account hash>`` after
    ``ACK``), not with nats-py's ``Msg.metadata``, which builds a timestamp and sequence objects
    to answer it (its cost: docs/benchmarks.md, "Accountant ingest")."""
    tokens = reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


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


def kill_row(k: KillSwitch) -> Row:
    # A switch event has no id of its own; its content is one (the same write redelivered is the
    # same fact, and two writers never put the same scope, state and millisecond apart).
    event_id = f"{k.scope}:{k.key}:{int(k.tripped)}:{k.time_ms}"
    return (event_id, utc(k.time_ms), k.scope, k.key, k.tripped, k.reason, k.by)


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


class Store:
    """The accountant's ClickHouse: opened (schema created) on start, closed on stop."""

    def __init__(self, url: str, database: str | None) -> None:
        self.url = url
        self.database = database
        self._ch: Client | None = None

    async def open(self) -> None:
        self._ch = await asyncio.to_thread(client, self.url)
        self.database = await asyncio.to_thread(create_schema, self._ch, self.database)
        # clickhouse-connect imports numpy and pandas on its first insert (about a second): now, not then.
        await asyncio.to_thread(_warm_up_inserts)

    def close(self) -> None:
        if self._ch is not None:
            self._ch.close()
            self._ch = None

    async def insert_new(self, sink: Sink[Any], batch: IngestBatch) -> int:
        """Insert the batch's rows but those of its redelivered keys already stored; return how many
        were inserted."""
        return await asyncio.to_thread(self._insert_new, sink, batch)

    def _insert_new(self, sink: Sink[Any], batch: IngestBatch) -> int:
        assert self._ch is not None and self.database is not None, "Store.open() first"
        rows = batch.rows
        if not rows:
            return 0
        db = ddl.quote_identifier(self.database)
        keys = sorted(batch.redelivered)
        seen: set[tuple[Any, ...]] = set()
        # The keys travel as one HTTP form field, which ClickHouse caps (about 4,000 keys): in slices.
        for start in range(0, len(keys), SELECT_KEYS):
            stored = self._ch.query(
                f"SELECT {', '.join(sink.key)} FROM {db}.{sink.table} WHERE {sink.key[0]} IN {{keys:Array(String)}}",
                parameters={"keys": keys[start : start + SELECT_KEYS]},
            ).result_rows
            seen.update(tuple(key) for key in stored)
        new = [row for key, row in rows.items() if key not in seen]
        if new:
            self._ch.insert(sink.table, new, column_names=list(sink.columns), database=self.database)
        return len(new)


def _warm_up_inserts() -> None:
    from clickhouse_connect.driver import options

    for name in ("np", "pd"):
        with contextlib.suppress(Exception):
            getattr(options, name)


@dataclass(frozen=True)
class IngestBatch:
    """A fetched batch, decoded: the messages to ack once stored, the rows by key, and the first
    key column of the rows whose message was delivered before (the only ones that may be stored)."""

    pending: list[Msg]
    rows: dict[tuple[Any, ...], Row]
    redelivered: set[Any]


class Ingest(Generic[M]):
    """Turns one fetched batch of a stream into (at most) one insert into ``sink.table``."""

    def __init__(self, bus: Bus, store: Store, sink: Sink[M], retry_delay_s: float) -> None:
        self.bus = bus
        self.store = store
        self.sink = sink
        self.retry_delay_s = retry_delay_s

    async def prepare(self, messages: Sequence[Msg]) -> IngestBatch:
        """Decode ``messages`` into an ``IngestBatch``; a message that cannot become a row is
        dead-lettered and acked here."""
        pending: list[Msg] = []
        rows: dict[tuple[Any, ...], Row] = {}
        redelivered: set[Any] = set()
        decode = self._decode
        to_row = self.sink.to_row
        key_of = self.sink.key_of
        for raw in messages:
            try:
                row = to_row(decode(raw.data))
            except (msgspec.DecodeError, ValueError) as exc:
                error = f"{self.sink.message_type.__name__}: {exc}"
                await self.bus.dead_letter(raw.subject, raw.data, raw.headers, error)
                await raw.ack()
                continue
            pending.append(raw)
            if row is not None:
                key = key_of(row)
                # The first copy wins: a redelivered or re-published message is the same fact.
                rows.setdefault(key, row)
                if delivery_count(raw.reply) > 1:
                    redelivered.add(key[0])
        return IngestBatch(pending, rows, redelivered)

    async def store_and_ack(self, batch: IngestBatch) -> None:
        """One insert of the new rows, then the acks; a failed insert naks them all with a delay."""
        pending, rows = batch.pending, batch.rows
        try:
            inserted = await self.store.insert_new(self.sink, batch)
        except Exception as exc:  # any ClickHouse or network failure: JetStream keeps the batch
            self.bus.log.error("insert_failed", table=self.sink.table, messages=len(pending), error=str(exc))
            for raw in pending:
                await raw.nak(delay=self.retry_delay_s)
            return
        for raw in pending:
            await raw.ack()
        self.bus.log.debug("batch", table=self.sink.table, messages=len(pending), rows=len(rows), inserted=inserted)

    @property
    def _decode(self) -> Callable[[bytes], M]:
        decoder = self.__dict__.get("_decoder")
        if decoder is None:
            decoder = self.__dict__["_decoder"] = msgspec.json.Decoder(self.sink.message_type).decode
        return decoder


class BatchConsumer:
    """An ``Ingest`` fed from a ``BatchPull`` (``Bus.pull``).

    While one batch is being stored, the next is fetched and decoded; stores run one at a time,
    so the duplicate check of a batch always sees the rows of the batch before it.
    """

    def __init__(self, ingest: Ingest[Any], pull: BatchPull) -> None:
        self.ingest = ingest
        self.pull = pull
        self._task: asyncio.Task[None] | None = None
        self._storing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pull.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop fetching; a store in progress finishes (its acks go out), the rest is redelivered."""
        if self._task is not None:
            self._task.cancel()
            # wait, not await: the fetch task's CancelledError is expected, and a cancellation of
            # stop() itself must still reach its caller.
            await asyncio.wait([self._task])
        if self._storing is not None:
            await asyncio.wait([self._storing], timeout=10)
        await self.pull.stop()

    async def _run(self) -> None:
        log = self.ingest.bus.log
        while True:
            try:
                batch = await self.pull.fetch()
                if not batch:
                    continue
                decoded = await self.ingest.prepare(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. disconnected: what was fetched is redelivered after ack_wait
                log.error("fetch_failed", stream=self.pull.stream, durable=self.pull.durable, error=str(exc))
                await asyncio.sleep(self.pull.batch_timeout_s)
                continue
            if self._storing is not None:
                # Not awaited directly: stopping the fetch loop must not cancel a store half-way.
                await asyncio.wait([self._storing])
            self._storing = asyncio.create_task(self.ingest.store_and_ack(decoded))
            self._storing.add_done_callback(self._stored)

    def _stored(self, storing: asyncio.Task[None]) -> None:
        if not storing.cancelled() and storing.exception() is not None:
            # Unacked, the batch comes back after ack_wait.
            self.ingest.bus.log.error("store_failed", stream=self.pull.stream, error=str(storing.exception()))
