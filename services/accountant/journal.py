"""Durable ledger: a group-committed journal in JetStream plus periodic snapshots.

Every ledger operation is appended here after it was applied in memory; ``append`` returns the
future of the batch it joined, which resolves once the batch is stored. The accountant replies
to a reserve or a settle only after that, so a decision a caller has seen is never lost by a
crash. Operations that arrive while one commit is in flight go together in the next one (group
commit: one JetStream publish carries up to ``MAX_BATCH`` operations, and up to
``MAX_IN_FLIGHT`` publishes are pipelined), so under load the journal adds about one JetStream
round trip to a reservation, not one per reservation.

Every ``snapshot_interval_s`` the committer also encodes the whole ledger as of the batch it is
about to publish, stores it in the Object Store ``<prefix>_ledger`` under the batch's sequence
number and then purges the journal up to that sequence, so a restart replays at most one
interval of operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore
from structlog.stdlib import BoundLogger

from schemas.subjects import BUCKET_LEDGER, STREAM_LEDGER, Subjects
from services.accountant.ledger import Ledger, Op

MAX_BATCH = 2000  # operations per journal message, well under NATS's 1 MB payload limit
MAX_IN_FLIGHT = 4  # journal writes awaiting their acknowledgement at once
SNAPSHOT = "snapshot"


class Batch(msgspec.Struct):
    ops: list[Op]


_decode_batch = msgspec.json.Decoder(Batch).decode


class Journal:
    def __init__(self, js: JetStreamContext, subjects: Subjects, log: BoundLogger, snapshot_interval_s: float) -> None:
        self.js = js
        self.subject = subjects.ledger
        self.stream = subjects.stream(STREAM_LEDGER)
        self.bucket = subjects.bucket(BUCKET_LEDGER)
        self.log = log
        self.snapshot_interval_s = snapshot_interval_s
        self.ledger = Ledger()
        self._store: ObjectStore | None = None
        # Batches waiting to be written, oldest first, each with the future its callers wait on.
        self._batches: deque[tuple[list[Op], asyncio.Future[None]]] = deque()
        self._wakeup = asyncio.Event()
        self._in_flight: asyncio.Future[None] | None = None
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._writes: set[asyncio.Task] = set()
        self._committer: asyncio.Task | None = None
        self._snapshotting: asyncio.Task | None = None
        self._last_snapshot = time.monotonic()
        self._encode = msgspec.json.Encoder().encode

    async def open(self) -> Ledger:
        """Declare the stream and store, rebuild the ledger from snapshot + journal, start committing."""
        config = StreamConfig(name=self.stream, subjects=[self.subject], storage=StorageType.FILE)
        try:
            await self.js.add_stream(config=config)
        except BadRequestError:
            await self.js.update_stream(config=config)
        try:
            self._store = await self.js.object_store(self.bucket)
        except BucketNotFoundError:
            self._store = await self.js.create_object_store(self.bucket)
        self.ledger = await self._recover()
        self._committer = asyncio.create_task(self._commit_forever())
        return self.ledger

    async def _recover(self) -> Ledger:
        assert self._store is not None
        try:
            stored = (await self._store.get(SNAPSHOT)).data
            header, state = stored.split(b"\n", 1)
            ledger, seq = Ledger.restore(state), int(header)
        except ObjectNotFoundError:
            ledger, seq = Ledger(), 0
        last = (await self.js.stream_info(self.stream)).state.last_seq
        replayed = 0
        if last > seq:
            sub = await self.js.subscribe(
                self.subject,
                stream=self.stream,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq + 1),
            )
            try:
                while True:
                    msg = await sub.next_msg(timeout=10)
                    for op in _decode_batch(msg.data).ops:
                        ledger.apply(op)
                        replayed += 1
                    if msg.metadata.sequence.stream >= last:
                        break
            finally:
                await sub.unsubscribe()
        for hold in ledger.holds.values():
            hold.recovered = True
        self.log.info("ledger_recovered", snapshot_seq=seq, replayed_ops=replayed, holds=len(ledger.holds))
        return ledger

    def append(self, op: Op) -> asyncio.Future[None]:
        """Queue an operation (already applied to the ledger); the future resolves once it is stored."""
        if not self._batches or len(self._batches[-1][0]) >= MAX_BATCH:
            future = asyncio.get_running_loop().create_future()
            # A failed write is reported to whoever waits; retrieving it here keeps asyncio quiet
            # about the batches nobody waits on (expiries, trips).
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._batches.append(([], future))
        ops, future = self._batches[-1]
        ops.append(op)
        self._wakeup.set()
        return future

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once every operation appended so far is stored."""
        if self._batches:
            return self._batches[-1][1]
        if self._in_flight is not None and not self._in_flight.done():
            return self._in_flight
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def _commit_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._batches:
                await self._slots.acquire()
                self._start_write()

    def _start_write(self) -> None:
        """Send the oldest batch without waiting for the one before it to be acknowledged.

        JetStream orders the writes of one connection, so the journal keeps the order of the
        ledger; pipelining only takes the acknowledgement's round trip off the next batch's wait.
        """
        ops, future = self._batches.popleft()
        self._in_flight = future
        # The ledger now holds exactly what the journal will hold once this batch is stored (every
        # applied op is stored, in flight or in this batch), so this is the moment to copy it.
        snapshot_due = (
            not self._batches
            and self._snapshotting is None
            and time.monotonic() - self._last_snapshot >= self.snapshot_interval_s
        )
        if snapshot_due:
            self._last_snapshot = time.monotonic()
        state = self.ledger.snapshot() if snapshot_due else None
        task = asyncio.create_task(self._write(self._encode(Batch(ops)), len(ops), future, state))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, data: bytes, n_ops: int, future: asyncio.Future[None], state: bytes | None) -> None:
        try:
            ack = await self.js.publish(self.subject, data, stream=self.stream)
        except Exception as exc:  # JetStream unavailable: the callers decide (a grant is withdrawn)
            self.log.error("journal_write_failed", ops=n_ops, error=str(exc))
            future.set_exception(exc)
            return
        finally:
            self._slots.release()
        future.set_result(None)
        if state is not None:
            self._snapshotting = asyncio.create_task(self._save_snapshot(state, ack.seq))

    async def _save_snapshot(self, state: bytes, seq: int) -> None:
        assert self._store is not None
        try:
            # A header line carries the sequence, known only once the batch was stored.
            await self._store.put(SNAPSHOT, b"%d\n" % seq + state)
            # Only after the snapshot is stored may the operations it covers go.
            await self.js.purge_stream(self.stream, seq=seq + 1)
            self.log.debug("ledger_snapshot", seq=seq, bytes=len(state))
        except Exception as exc:  # the journal still has everything; the next interval retries
            self.log.error("ledger_snapshot_failed", seq=seq, error=str(exc))
        finally:
            self._snapshotting = None

    async def close(self) -> None:
        """Store what is queued, then stop."""
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            while self._batches:
                await self._slots.acquire()
                self._start_write()
        if self._writes:
            await asyncio.wait(self._writes)
        if self._snapshotting is not None:
            with contextlib.suppress(Exception):
                await self._snapshotting
