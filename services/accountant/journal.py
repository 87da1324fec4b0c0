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

A write JetStream refuses, or does not acknowledge within ``ACK_TIMEOUT_S``, is retried, in order:
the journal turns ``healthy`` false (the accountant grants nothing new until it is true again),
publishes nothing more, and once every write in flight is answered it reads the stream's last
sequence. If that is still the one the first failed write expected, nobody else wrote and none of
the failed writes was stored: they go back to the head of the queue, oldest first, and are sent
again, every ``RETRY_FIRST_S`` doubling to ``RETRY_MAX_S``, until one lands (then ``healthy`` is true
again). Meanwhile the waiters of every commit not stored are run with the error at once (a grant is
withdrawn: nobody waits on a journal that may be away for minutes), but the operations stay queued:
a settle never lives only in memory. If the last sequence moved (another leader wrote, or a write
that timed out was stored after all), the journal is ``fenced``: it writes nothing more, and the
accountant ends its term and opens the journal again (``lease.Leadership``), rebuilding the ledger
from what was stored. An operation lost then, or by a crash before its write landed, is a settle at
worst: its hold comes back and is reconciled when it expires (reservations.py, usage_watch.py).

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
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from schemas.subjects import (
    BUCKET_LEDGER,
    HEADER_EXPECTED_LAST_SEQUENCE,
    HEADER_EXPECTED_STREAM,
    HEADER_STATUS,
    STATUS_NO_RESPONDERS,
    STREAM_LEDGER,
)
from services.accountant.journal_store import JournalBatch, JournalWriteError, decode_ack, recover, save_snapshot
from services.accountant.ledger import Ledger, Op
from services.runtime.bus import Bus
from services.runtime.streams import ensure_stream

MAX_BATCH = 2000  # operations per journal message, well under NATS's 1 MB payload limit
MAX_IN_FLIGHT = 4  # journal messages awaiting their acknowledgement at once
ACK_TIMEOUT_S = 5.0  # a message not acknowledged by then counts as not stored
# Between tries of failed writes: doubling from the first, at most the last.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 2.0
CLOSE_RETRY_S = 3.0  # a graceful stop waits this long for failed writes to land

# Run with the commit once it is stored (error None) or could not be (the error). Given the commit
# rather than bound to it, so a commit and its waiters make no reference cycle for the collector.
Waiter = Callable[["Commit", BaseException | None], Awaitable[None]]


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
    expected: int  # the stream's last sequence it must follow


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
        # Writes refused or unanswered, by write number, until they are queued again (``_retry``).
        self._failed: dict[int, _Write] = {}
        self._retrying: asyncio.Task | None = None
        self._retry_delay_s = RETRY_FIRST_S
        # False from a failed write until a write lands again: no grant is answered meanwhile.
        self.healthy = True
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
        # Set once the stream moved on under a failed write: the journal writes nothing more.
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
        self.ledger, last = await recover(self.bus, self._store, self.subject, self.stream)
        self._next_seq = await self._fence(last)
        self._ack_inbox = self.bus.new_inbox() + "."
        self._ack_sub = await self.bus.subscribe_core(self._ack_inbox + "*", self._on_ack)
        self._committer = asyncio.create_task(self._commit_forever())
        return self.ledger

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
        published = self._unacked.keys() | self._failed.keys()
        if published:
            newest = max(published)
            return (self._unacked.get(newest) or self._failed[newest]).commit
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
        while self._pending and len(self._unacked) < MAX_IN_FLIGHT and not self._failed and not self.fenced.is_set():
            commit = self._pending.popleft()
            self._writes += 1
            write = self._writes
            timeout = asyncio.get_running_loop().call_later(ACK_TIMEOUT_S, self._ack_timed_out, write)
            self._unacked[write] = _Write(commit, timeout, self._snapshot_if_due(), self._next_seq)
            try:
                # nats-py queues the bytes before anything in publish() can suspend, so a commit
                # published meanwhile by the acknowledgement callback still goes out after this one.
                data = self._encode(JournalBatch(commit.ops))
                headers = {HEADER_EXPECTED_STREAM: self.stream, HEADER_EXPECTED_LAST_SEQUENCE: str(self._next_seq)}
                self._next_seq += 1
                await self.bus.publish_core(self.subject, data, reply=f"{self._ack_inbox}{write}", headers=headers)
            except Exception as exc:  # connection closed, or its buffer full while reconnecting
                self._done(write, exc)
                await self._fail_waiters(exc)

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
                ack = decode_ack(msg.data)
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
        if commit is None:
            return
        await self._publish_ready()
        if error is None:
            await self._notify(commit, None)
        else:
            await self._fail_waiters(error)

    def _done(self, write: int, error: BaseException | None, seq: int = 0) -> Commit | None:
        """Take a write off the unacknowledged ones; None if it already was (answered after timing out)."""
        done = self._unacked.pop(write, None)
        if done is None:
            return None
        done.timeout.cancel()
        self._progress.set()
        if error is not None:  # refused or unanswered: sent again once the writes in flight are answered
            self.log.error("journal_write_failed", ops=len(done.commit.ops), error=str(error))
            self.healthy = False
            self._failed[write] = done
        else:
            if not self._failed:
                self.healthy, self._retry_delay_s = True, RETRY_FIRST_S
            if done.state is not None:
                self._snapshotting = asyncio.create_task(self._save_snapshot(done.state, seq))
        if self._failed and not self._unacked and self._retrying is None and not self.fenced.is_set():
            self._retrying = asyncio.create_task(self._retry())
        return done.commit

    async def _retry(self) -> None:
        """Queue the failed writes again, oldest first, once the stream shows none of them stored and
        nobody else wrote; else fence the journal (see the module docstring)."""
        try:
            while True:
                await asyncio.sleep(self._retry_delay_s)
                self._retry_delay_s = min(2 * self._retry_delay_s, RETRY_MAX_S)
                try:
                    last = (await self.bus.jetstream.stream_info(self.stream)).state.last_seq
                except NotFoundError:
                    last = -1  # the stream is gone: what it held with it
                except Exception as exc:  # NATS unreachable: the lease decides whether this term goes on
                    self.log.warning("journal_unreadable", error=str(exc))
                    continue
                expected = self._failed[min(self._failed)].expected
                if last != expected:
                    self.log.error("journal_moved_on", expected=expected, last=last)
                    self.fenced.set()
                    return
                self._pending.extendleft(reversed([self._failed.pop(w).commit for w in sorted(self._failed)]))
                self._next_seq = last
                break
        finally:
            self._retrying = None
        self._progress.set()
        await self._publish_ready()

    async def _fail_waiters(self, error: BaseException) -> None:
        """Run every waiter of a commit not stored with ``error``: once each, the operations stay queued."""
        for commit in [*(w.commit for w in self._failed.values()), *self._pending]:
            if commit.waiters:
                await self._notify(commit, error)

    async def _notify(self, commit: Commit, error: BaseException | None) -> None:
        waiters, commit.waiters = commit.waiters, []
        for waiter in waiters:
            try:
                await waiter(commit, error)
            except Exception as exc:  # one waiter's failure (its caller went away) is not the others'
                self.log.error("journal_waiter_failed", error=str(exc))

    async def _save_snapshot(self, state: bytes, seq: int) -> None:
        assert self._store is not None
        try:
            await save_snapshot(self.bus, self._store, self.stream, state, seq)
        except Exception as exc:  # the journal still has everything; the next interval retries
            self.log.error("ledger_snapshot_failed", seq=seq, error=str(exc))
        finally:
            self._snapshotting = None

    async def abandon(self) -> None:
        """Stop without writing anything more (a term that ended: the lease lost, or the journal
        fenced): every commit not yet stored fails its waiters."""
        tasks = [task for task in (self._committer, self._snapshotting, self._retrying) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.fenced.set()
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
        await self._drop_unstored(JournalWriteError("the accountant's term ended before this was stored"))

    async def close(self) -> None:
        """Store what is queued (failed writes retried for up to ``CLOSE_RETRY_S``) and run its waiters, then stop."""
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        # Each write is answered or times out; what is still queued or failed gets until give_up.
        give_up = time.monotonic() + CLOSE_RETRY_S
        while True:
            self._progress.clear()
            await self._publish_ready()  # also what was appended meanwhile (a trip landing)
            queued = (self._failed or self._pending) and not self.fenced.is_set()
            if not self._unacked and not (queued and time.monotonic() < give_up):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), max(give_up - time.monotonic(), RETRY_FIRST_S))
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
        if self._snapshotting is not None:
            with contextlib.suppress(Exception):
                await self._snapshotting
        await self._drop_unstored(JournalWriteError("the accountant stopped before this was stored"))

    async def _drop_unstored(self, error: BaseException) -> None:
        """End of the journal: what was not stored is lost from it (its holds are reconciled after a restart)."""
        self.fenced.set()
        for write in list(self._unacked):
            self._done(write, error)
        unstored = [*(w.commit for w in self._failed.values()), *self._pending]
        self._failed.clear()
        self._pending.clear()
        for commit in unstored:
            await self._notify(commit, error)
