"""Durable ledger: a group-committed journal in JetStream plus periodic snapshots.

Every ledger operation is appended here after it was applied in memory; ``append`` returns the
``Commit`` (one journal message) it joined. The accountant answers a reservation only once that
commit is stored, so a decision a caller has seen is never lost by a crash.

Group commit: the operations decided while the event loop works through a burst of requests go
out together, one JetStream message of up to ``MAX_BATCH`` operations, published one loop turn
after the first of them; up to ``MAX_IN_FLIGHT`` messages await their acknowledgement at once,
and while that many are out the next commit grows. Acknowledgements come to the journal's own
inbox, and the callback that reads one publishes the next commit and runs the commit's waiters
there and then (the accountant's send the replies parked on it): no future, task or timer stands
between an acknowledgement and its replies, since under load each such hop waits behind a whole
burst of decisions (measured in docs/benchmarks.md, "Reservation round trip").

Fencing (several accountant replicas, one leading: ``lease.py``): every journal message carries
the stream sequence it must follow (``Nats-Expected-Last-Sequence``), and JetStream stores it only
if the stream's last message is that one. The journal learns that sequence when it opens, by
storing an empty message after the last one it replayed (``_fence``): from then on a deposed
leader's writes, which expect an older sequence, are refused, and a journal that opened before
another wrote fails to open, so its ledger is rebuilt. Every stored message was thus decided on a
ledger holding exactly the messages before it: two replicas can never both spend the same room.

A write JetStream refuses, or does not acknowledge within ``ACK_TIMEOUT_S``, is not retried: its
waiters get the error (a grant is withdrawn), and the journal is ``fenced``: it writes nothing
more, since the sequences it expects no longer hold. The accountant then ends its term and opens
the journal again (``lease.Leadership``), rebuilding the ledger from what was stored: an operation
lost with the write is gone (a lost settle leaves its hold, charged in full when it expires).

Every ``snapshot_interval_s`` the committer also encodes the whole ledger as of the commit it is
about to publish, stores it in the Object Store ``<prefix>_ledger`` under that commit's sequence
number and then purges the journal up to that sequence, so a restart replays at most one
interval of operations. A snapshot older than the stored one (a deposed leader's, late) is
dropped, so the stored snapshot never goes back to before what was purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy, ObjectMeta, StorageType, StreamConfig
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore

from schemas.subjects import (
    BUCKET_LEDGER,
    HEADER_EXPECTED_LAST_SEQUENCE,
    HEADER_EXPECTED_STREAM,
    HEADER_STATUS,
    STATUS_NO_RESPONDERS,
    STREAM_LEDGER,
)
from services.accountant.ledger import Ledger, Op
from services.runtime.bus import Bus
from services.runtime.streams import ensure_stream

MAX_BATCH = 2000  # operations per journal message, well under NATS's 1 MB payload limit
MAX_IN_FLIGHT = 4  # journal messages awaiting their acknowledgement at once
ACK_TIMEOUT_S = 5.0  # a message not acknowledged by then counts as not stored
SNAPSHOT = "snapshot"

# Run with the commit once it is stored (error None) or could not be (the error). Given the commit
# rather than bound to it, so a commit and its waiters make no reference cycle for the collector.
Waiter = Callable[["Commit", BaseException | None], Awaitable[None]]


class JournalWriteError(Exception):
    """JetStream did not store a journal message: it refused it, or did not acknowledge it in time."""


class JournalBatch(msgspec.Struct):
    """One journal message: the operations of one commit, in ledger order."""

    ops: list[Op]


class _ApiError(msgspec.Struct):
    description: str = ""


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: _ApiError | None = None


_decode_batch = msgspec.json.Decoder(JournalBatch).decode
_decode_ack = msgspec.json.Decoder(_PubAck).decode


class Commit:
    """One journal message: operations in ledger order, and who waits for it to be stored."""

    __slots__ = ("ops", "waiters")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.waiters: list[Waiter] = []

    def on_stored(self, waiter: Waiter) -> None:
        """Run ``waiter`` once the commit is stored or has failed (a commit ``append`` or
        ``barrier`` just returned is neither yet, so no waiter is ever late)."""
        self.waiters.append(waiter)


@dataclass
class _Write:
    """A published commit awaiting its acknowledgement."""

    commit: Commit
    timeout: asyncio.TimerHandle
    state: bytes | None  # the ledger snapshot to store under this message's sequence, if due


class Journal:
    """The ledger's durable copy; ``open`` rebuilds the ledger from it, ``append`` adds to it."""

    def __init__(self, bus: Bus, snapshot_interval_s: float) -> None:
        self.bus = bus
        subjects = bus.subjects
        self.subject = subjects.ledger
        self.stream = subjects.stream(STREAM_LEDGER)
        self.bucket = subjects.bucket(BUCKET_LEDGER)
        self.log = bus.log
        self.snapshot_interval_s = snapshot_interval_s
        self.ledger = Ledger()
        self._store: ObjectStore | None = None
        # Commits not yet published, oldest first; only the last one still takes operations.
        self._pending: deque[Commit] = deque()
        # Published commits by write number (in publishing order), until acknowledged or failed.
        self._unacked: dict[int, _Write] = {}
        self._writes = 0
        self._ack_inbox = ""
        self._ack_sub: Subscription | None = None
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._timeouts: set[asyncio.Task] = set()
        self._committer: asyncio.Task | None = None
        self._snapshotting: asyncio.Task | None = None
        self._last_snapshot = time.monotonic()
        self._encode = msgspec.json.Encoder().encode
        # The stream's last sequence once every message published so far is stored: the next one expects it.
        self._next_seq = 0
        # Set once a write failed: the journal writes nothing more (see the module docstring).
        self.fenced = asyncio.Event()

    async def open(self) -> Ledger:
        """Declare the stream and store, rebuild the ledger from snapshot + journal, start committing."""
        await ensure_stream(
            self.bus.jetstream,
            StreamConfig(
                name=self.stream,
                subjects=[self.subject],
                storage=StorageType.FILE,
                num_replicas=self.bus.settings.replicas,
            ),
        )
        self._store = await self.bus.object_store(self.bucket)
        self.ledger, last = await self._recover()
        self._next_seq = await self._fence(last)
        self._ack_inbox = self.bus.new_inbox() + "."
        self._ack_sub = await self.bus.subscribe_core(self._ack_inbox + "*", self._on_ack)
        self._committer = asyncio.create_task(self._commit_forever())
        return self.ledger

    async def _recover(self) -> tuple[Ledger, int]:
        """The ledger as of the journal's last message, and that message's sequence."""
        assert self._store is not None
        try:
            stored = (await self._store.get(SNAPSHOT)).data
            if stored is None:
                raise ObjectNotFoundError
            header, state = stored.split(b"\n", 1)
            ledger, seq = Ledger.restore(state), int(header)
        except ObjectNotFoundError:
            ledger, seq = Ledger(), 0
        last = (await self.bus.jetstream.stream_info(self.stream)).state.last_seq
        replayed = 0
        if last > seq:
            sub = await self.bus.jetstream.subscribe(
                self.subject,
                stream=self.stream,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq + 1),
            )
            try:
                first = seq + 1
                while True:
                    msg = await sub.next_msg(timeout=10)
                    if first and msg.metadata.sequence.stream > first:
                        # Purged past this snapshot meanwhile (a deposed leader's late snapshot): read again.
                        raise JournalWriteError(f"journal purged past snapshot {seq} during the replay")
                    first = 0
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
        return ledger, last

    async def _fence(self, last: int) -> int:
        """Store an empty message right after ``last``: any writer expecting an older sequence is
        refused from now on. Raises ``JournalWriteError`` if another message came first."""
        headers = {HEADER_EXPECTED_STREAM: self.stream, HEADER_EXPECTED_LAST_SEQUENCE: str(last)}
        try:
            ack = await self.bus.jetstream.publish(
                self.subject, self._encode(JournalBatch([])), stream=self.stream, headers=headers
            )
        except Exception as exc:
            raise JournalWriteError(f"the journal moved on while it was replayed: {exc}") from exc
        return ack.seq

    def append(self, op: Op) -> Commit:
        """Queue an operation (already applied to the ledger); returns the commit that will carry it."""
        if not self._pending or len(self._pending[-1].ops) >= MAX_BATCH:
            self._pending.append(Commit())
        commit = self._pending[-1]
        commit.ops.append(op)
        self._wakeup.set()
        return commit

    def barrier(self) -> Commit | None:
        """The commit whose storing means every operation appended so far is stored; None if they are."""
        if self._pending:
            return self._pending[-1]
        if self._unacked:
            return next(reversed(self._unacked.values())).commit
        return None

    async def _commit_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._publish_ready()

    async def _publish_ready(self) -> None:
        """Publish pending commits, oldest first, while fewer than ``MAX_IN_FLIGHT`` are unacknowledged.

        Publishing does not wait for earlier acknowledgements: JetStream stores the messages of
        one connection in the order sent, so the journal keeps the order of the ledger.
        """
        while self._pending and len(self._unacked) < MAX_IN_FLIGHT and not self.fenced.is_set():
            commit = self._pending.popleft()
            self._writes += 1
            write = self._writes
            timeout = asyncio.get_running_loop().call_later(ACK_TIMEOUT_S, self._ack_timed_out, write)
            self._unacked[write] = _Write(commit, timeout, self._snapshot_if_due())
            try:
                # nats-py queues the bytes before anything in publish() can suspend, so a commit
                # published meanwhile by the acknowledgement callback still goes out after this one.
                data = self._encode(JournalBatch(commit.ops))
                headers = {HEADER_EXPECTED_STREAM: self.stream, HEADER_EXPECTED_LAST_SEQUENCE: str(self._next_seq)}
                self._next_seq += 1
                await self.bus.publish_core(self.subject, data, reply=f"{self._ack_inbox}{write}", headers=headers)
            except Exception as exc:  # connection closed, or its buffer full while reconnecting
                self._done(write, exc)
                await self._notify(commit, exc)

    def _snapshot_if_due(self) -> bytes | None:
        """The ledger's state when a snapshot is due and the commit being published is the last
        pending one: the ledger then holds exactly what the journal will once it is stored."""
        if (
            self._pending
            or self._snapshotting is not None
            or time.monotonic() - self._last_snapshot < self.snapshot_interval_s
        ):
            return None
        self._last_snapshot = time.monotonic()
        return self.ledger.snapshot()

    async def _on_ack(self, msg: Msg) -> None:
        write = int(msg.subject[len(self._ack_inbox) :])
        seq, error = 0, None
        if msg.headers and msg.headers.get(HEADER_STATUS) == STATUS_NO_RESPONDERS:
            error = JournalWriteError(f"no stream {self.stream} for {self.subject}")
        else:
            try:
                ack = _decode_ack(msg.data)
                seq = ack.seq
                if ack.error is not None:
                    error = JournalWriteError(ack.error.description)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                error = JournalWriteError(f"unreadable acknowledgement: {exc}")
        await self._finish(write, error, seq)

    def _ack_timed_out(self, write: int) -> None:
        error = JournalWriteError(f"not acknowledged within {ACK_TIMEOUT_S} s")
        task = asyncio.get_running_loop().create_task(self._finish(write, error))
        self._timeouts.add(task)
        task.add_done_callback(self._timeouts.discard)

    async def _finish(self, write: int, error: BaseException | None, seq: int = 0) -> None:
        """A write was answered (or timed out): its slot lets the next commit out, then its waiters run."""
        commit = self._done(write, error, seq)
        if commit is not None:
            await self._publish_ready()
            await self._notify(commit, error)

    def _done(self, write: int, error: BaseException | None, seq: int = 0) -> Commit | None:
        """Take a write off the unacknowledged ones; None if it already was (answered after timing out)."""
        done = self._unacked.pop(write, None)
        if done is None:
            return None
        done.timeout.cancel()
        self._progress.set()
        if error is not None:  # refused or unanswered: the waiters decide (a grant is withdrawn)
            self.log.error("journal_write_failed", ops=len(done.commit.ops), error=str(error))
            self.fenced.set()
        elif done.state is not None:
            self._snapshotting = asyncio.create_task(self._save_snapshot(done.state, seq))
        return done.commit

    async def _notify(self, commit: Commit, error: BaseException | None) -> None:
        for waiter in commit.waiters:
            try:
                await waiter(commit, error)
            except Exception as exc:  # one waiter's failure (its caller went away) is not the others'
                self.log.error("journal_waiter_failed", error=str(exc))

    async def _save_snapshot(self, state: bytes, seq: int) -> None:
        assert self._store is not None
        try:
            stored = await self._stored_snapshot_seq()
            if stored > seq:  # a newer leader's: this one is out of date
                return
            # A header line carries the sequence, known only once the commit was stored; the
            # description too, so the check above reads it without fetching the snapshot.
            await self._store.put(SNAPSHOT, b"%d\n" % seq + state, meta=ObjectMeta(SNAPSHOT, description=str(seq)))
            # Only after the snapshot is stored may the operations it covers go.
            await self.bus.jetstream.purge_stream(self.stream, seq=seq + 1)
            self.log.debug("ledger_snapshot", seq=seq, bytes=len(state))
        except Exception as exc:  # the journal still has everything; the next interval retries
            self.log.error("ledger_snapshot_failed", seq=seq, error=str(exc))
        finally:
            self._snapshotting = None

    async def _stored_snapshot_seq(self) -> int:
        assert self._store is not None
        try:
            return int((await self._store.get_info(SNAPSHOT)).description or 0)
        except ObjectNotFoundError:
            return 0

    async def abandon(self) -> None:
        """Stop without writing anything more (a term that ended: the lease lost, or a write refused):
        every commit not yet stored fails its waiters."""
        tasks = [task for task in (self._committer, self._snapshotting) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.fenced.set()
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
        error = JournalWriteError("the accountant's term ended before this was stored")
        for write in list(self._unacked):
            commit = self._done(write, error)
            if commit is not None:
                await self._notify(commit, error)
        while self._pending:
            await self._notify(self._pending.popleft(), error)

    async def close(self) -> None:
        """Store what is queued and run its waiters, then stop."""
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        await self._publish_ready()
        # Each acknowledgement publishes the next pending commit; each write times out at worst.
        while self._unacked:
            self._progress.clear()
            await self._progress.wait()
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
        if self._snapshotting is not None:
            with contextlib.suppress(Exception):
                await self._snapshotting
        while self._pending:  # fenced meanwhile: never to be published
            await self._notify(self._pending.popleft(), JournalWriteError("the journal was fenced"))
