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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic

import msgspec
from clickhouse_connect.driver.client import Client
from nats.aio.msg import Msg

from services.accountant import ddl
from services.accountant.clickhouse import client, create_schema
from services.accountant.rows import M, Row, Sink
from services.runtime.bus import Bus
from services.runtime.dead_letters import UNREADABLE
from services.runtime.pull import BatchPull

SELECT_KEYS = 2000  # keys per duplicate-check SELECT


def delivery_count(reply: str) -> int:
    """How many times a JetStream message has been delivered, read from its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>...``, or with ``<domain>.<account hash>`` after
    ``ACK``), not with nats-py's ``Msg.metadata``, which builds a timestamp and sequence objects
    to answer it (its cost: docs/benchmarks.md, "Accountant ingest")."""
    tokens = reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


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
            except (*UNREADABLE, ValueError) as exc:
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
