"""Which accountant replica serves budgets: a lease in a KV bucket, taken and kept by compare-and-set.

Every replica ingests (its durable consumers are shared); exactly one, the leader, decides
reservations and settles, answers budget changes and queries, expires holds, trips switches and
paces tenants. Two leaders would each grant up to the full cap.

The lease is one key (``LEASE_KEY`` in ``<prefix>_accountant_lease``) holding the leader's name.
The leader renews it every ``renew_s`` by writing it again, conditioned on the revision it last
wrote (KV update with ``last``). A standby reads it every ``poll_s``; once it has seen the same
revision for ``lease_s``, the leader is presumed gone and the standby writes the key conditioned
on that revision: of several standbys exactly one succeeds. A leader that cannot renew within
``lease_s`` of its last renewal (by its own clock, counted from when it sent that renewal, so
never later than a standby's count) stops serving; a refused renewal means another took over.
A leader that stops gracefully deletes the key, and a standby takes over at its next poll. A
replica that finds the key still at the revision it wrote itself (its renewals failed while NATS
was unreachable, and nobody wrote since) takes it back at once.

Time is only the trigger. The guarantee is the journal's fence (``journal.py``): a new term opens
by storing a message right after the last one it replayed, and every write expects the sequence
before it, so a deposed leader that still thinks it leads (a process paused longer than the lease)
has each write refused, its grants withdrawn, and cannot spend room the new leader hands out.

Takeover after a leader dies: ``lease_s`` plus up to ``poll_s``, plus rebuilding the ledger from
the last snapshot and the journal since (measured: docs/deploy.md). A journal that is fenced (a
write failed and the stream moved on under it: journal.py) ends the term too: the leader, still
holding the lease, opens a new term at once from what the journal stored.

Deliberately not done: leases per tenant partition (one leader holds all budgets).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.subjects import BUCKET_ACCOUNTANT_LEASE, LEASE_KEY
from services.runtime.bus import Bus

LEASE_S = 2.0
RENEW_S = 0.5
POLL_S = 0.25
# A term that failed to start (JetStream electing a stream leader) is tried again after this long.
RETRY_TERM_S = 0.5

# Starts a term (rebuild the ledger, subscribe); returns the event set when the term's journal is fenced.
Lead = Callable[[], Awaitable[asyncio.Event]]
# Ends a term: graceful (store what the journal holds) or not (write nothing more).
Resign = Callable[[bool], Awaitable[None]]


def holder_name() -> str:
    """This process's name in the lease: host, process id and a random suffix (process ids repeat)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Lease:
    """The lease key, as one replica sees it."""

    def __init__(self, bus: Bus, holder: str, lease_s: float = LEASE_S) -> None:
        self.bus = bus
        self.holder = holder
        self.lease_s = lease_s
        self.revision = 0  # the revision this replica last wrote, while it holds the lease
        self.other_alive = False  # another replica was seen renewing it
        self._seen: tuple[int, float] | None = None  # another holder's revision and when it was first seen
        self._kv: KeyValue | None = None

    async def open(self) -> None:
        self._kv = await self.bus.key_value(self.bus.subjects.bucket(BUCKET_ACCOUNTANT_LEASE), history=1)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "Lease.open() first"
        return self._kv

    async def try_acquire(self) -> bool:
        """Take the lease if it is free, released or not renewed for ``lease_s``; False otherwise."""
        try:
            entry = await self.kv.get(LEASE_KEY)
        except KeyNotFoundError:  # never taken, or released (a KeyDeletedError is one)
            return await self._write(None)
        if entry.revision == self.revision and entry.value == self.holder.encode():
            return await self._write(entry.revision)  # still this replica's own, untouched since: renew it
        now = time.monotonic()
        if self._seen is None or self._seen[0] != entry.revision:
            self.other_alive = self._seen is not None
            self._seen = (entry.revision or 0, now)
            return False
        if now - self._seen[1] < self.lease_s:
            return False
        return await self._write(entry.revision)

    async def _write(self, last: int | None) -> bool:
        value = self.holder.encode()
        try:
            if last is None:
                self.revision = await self.kv.create(LEASE_KEY, value)
            else:
                self.revision = await self.kv.update(LEASE_KEY, value, last=last)
        except KeyWrongLastSequenceError:  # another replica was quicker
            return False
        self._seen = None
        return True

    async def renew(self) -> bool:
        """Write the lease again after this replica's own last write; False if another wrote since."""
        try:
            self.revision = await self.kv.update(LEASE_KEY, self.holder.encode(), last=self.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def release(self) -> None:
        """Give the lease up (a graceful stop): a standby takes it at its next poll."""
        with contextlib.suppress(NatsError, TimeoutError):
            await self.kv.delete(LEASE_KEY, last=self.revision)


class Leadership:
    """Campaigns for the lease; while holding it, runs terms (``lead``) until the lease is lost or the
    term's journal is fenced, then ends them (``resign``)."""

    def __init__(
        self, bus: Bus, lead: Lead, resign: Resign, *, lease_s: float = LEASE_S, poll_s: float = POLL_S
    ) -> None:
        self.lease = Lease(bus, holder_name(), lease_s)
        self.log = bus.log
        self.poll_s = poll_s
        self.renew_s = min(RENEW_S, lease_s / 4)
        self._lead = lead
        self._resign = resign
        self.leading = False  # a term is running: this replica serves budgets
        self._settled = asyncio.Event()  # this replica leads, or has seen another one lead
        self._run_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Campaign, and return once this replica leads or has seen another replica renew the lease."""
        await self.lease.open()
        self._run_task = asyncio.create_task(self._run())
        settled = asyncio.create_task(self._settled.wait())
        await asyncio.wait({settled, self._run_task}, return_when=asyncio.FIRST_COMPLETED)
        settled.cancel()
        if self._run_task.done():
            self._run_task.result()  # raises what stopped the campaign

    async def stop(self) -> None:
        """Stop campaigning; a leader ends its term gracefully and releases the lease."""
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
        if self.leading:
            await self._end_term(graceful=True)
            await self.lease.release()

    async def _run(self) -> None:
        while True:
            if not await self._acquire():
                if self.lease.other_alive:
                    self._settled.set()
                await asyncio.sleep(self.poll_s)
                continue
            self.log.info("accountant_leading", holder=self.lease.holder, revision=self.lease.revision)
            renewing = asyncio.create_task(self._renew_until_lost(time.monotonic() + self.lease.lease_s))
            try:
                while not renewing.done():
                    await self._serve_one_term(renewing)
            finally:
                renewing.cancel()
            self.log.warning("accountant_lease_lost", holder=self.lease.holder)

    async def _acquire(self) -> bool:
        try:
            return await self.lease.try_acquire()
        except (NatsError, TimeoutError) as exc:  # NATS unavailable: try again at the next poll
            self.log.warning("accountant_lease_unreadable", error=str(exc))
            return False

    async def _serve_one_term(self, renewing: asyncio.Task) -> None:
        """Start a term, serve until the lease is lost or the journal fenced, end it."""
        try:
            self.leading = True
            fenced = await self._lead()
        except Exception as exc:
            self.log.error("accountant_term_failed_to_start", error=str(exc))
            await self._end_term(graceful=False)
            await asyncio.wait({renewing}, timeout=RETRY_TERM_S)
            return
        self._settled.set()
        fenced_wait = asyncio.create_task(fenced.wait())
        try:
            await asyncio.wait({renewing, fenced_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fenced_wait.cancel()
        self.log.warning("accountant_term_ended", fenced=fenced.is_set(), lease_lost=renewing.done())
        await self._end_term(graceful=False)

    async def _end_term(self, *, graceful: bool) -> None:
        self.leading = False
        try:
            await self._resign(graceful)
        except Exception as exc:  # a term half started, NATS gone: nothing more to write anyway
            self.log.error("accountant_resign_failed", error=str(exc))

    async def _renew_until_lost(self, valid_until: float) -> None:
        """Renew every ``renew_s``; return once a renewal is refused or none succeeded within ``lease_s``."""
        while True:
            await asyncio.sleep(self.renew_s)
            sent = time.monotonic()
            try:
                renewed = await asyncio.wait_for(self.lease.renew(), max(valid_until - sent, 0.001))
            except (NatsError, TimeoutError) as exc:
                self.log.warning("accountant_lease_not_renewed", error=str(exc) or type(exc).__name__)
                renewed = None
            if renewed:
                valid_until = sent + self.lease.lease_s
            elif renewed is False or time.monotonic() >= valid_until:
                return
