"""Budgets at run time (``Accounts``): reservations, settles, expiry, cap-crossing kill switches and pacing.

Decisions are exact under any concurrency because a decision and its effect on the ledger are
one synchronous step (``decide_reserve`` never awaits between the cap check and the update);
a grant's reply then waits for the journal (``journal.py``), so a grant that was answered
survives a crash. A grant's reply carries the accountant's signature of it
(``ReservationDecision.grant``, services/runtime/grants.py), without which an inference service
runs no paid call. One accountant owns the budgets: the reserve and settle subjects are served
by the replica holding the lease (``lease.py``), one term at a time: ``start`` begins a term
(rebuilding the ledger from the journal), ``stop`` or ``abandon`` ends it.

A hold that expires unsettled is charged its call's metered cost, else its worst case
(``usage_watch.py``). While the journal cannot store (``Journal.healthy``) no hold is granted: the
refusal starts ``budget service unavailable``, retryable; settles are still booked and queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Callable
from typing import cast

from schemas.messages import (
    BudgetQuery,
    BudgetState,
    BudgetUpdate,
    KillScope,
    KillSwitch,
    PaceAction,
    PaceSignal,
    Reservation,
    ReservationDecision,
)
from schemas.subjects import token
from services.accountant.budget import BudgetBook, BudgetConfig
from services.accountant.control_writes import ControlWriter, TripWrite
from services.accountant.journal import Commit, Journal
from services.accountant.ledger import (
    Bucket,
    Expire,
    Grant,
    Ledger,
    Op,
    Settle,
    Trip,
    TripWritten,
    buckets_for,
    day_period,
    dollars,
    month_period,
    pico,
    task_key,
)
from services.accountant.pacing import curve, pace_action
from services.accountant.statement import budget_state
from services.accountant.usage_watch import UsageWatch, read_from_ms
from services.runtime.bus import Bus
from services.runtime.control import ControlState, task_switch_key
from services.runtime.grants import GrantSigner
from services.runtime.reservations import UNAVAILABLE

MsClock = Callable[[], int]  # the time in ms since the epoch (tests move it)

PRUNE_EVERY_MS = 60_000
KEEP_SETTLED_IDS_MS = 24 * 3_600_000  # a settle repeated within a day is recognised
KEEP_IDLE_TASKS_MS = 7 * 24 * 3_600_000


def _past(bucket: Bucket, now_ms: int) -> bool:
    """Whether ``bucket`` is of a past day or month, whose cap no longer stops anything."""
    return bucket[2] in ("day", "month") and bucket[3] not in (day_period(now_ms), month_period(now_ms))


def describe(bucket: Bucket) -> str:
    scope, key, window, period = bucket
    if scope == "task":
        return f"task {key} budget"
    name = "global" if scope == "global" else f"{scope} {key}"
    return f"{name} {window} cap ({period})"


class Accounts:
    """What the accountant keeps: the caps in force (``book``), the spend and holds against them
    (``ledger``, made durable by ``journal``) and the control switches it obeys and trips."""

    def __init__(
        self,
        bus: Bus,
        config: BudgetConfig,
        clock: MsClock,
        *,
        signer: GrantSigner,
        expiry_grace_ms: int,
        sweep_interval_s: float,
        snapshot_interval_s: float,
        pace_interval_s: float,
    ) -> None:
        self.bus = bus
        self.config = config
        self.clock = clock
        self.signer = signer
        self.expiry_grace_ms = expiry_grace_ms
        self.sweep_interval_s = sweep_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.pace_interval_s = pace_interval_s
        self.book = BudgetBook(config)
        self.ledger = Ledger()
        self.journal: Journal | None = None
        self.usage = UsageWatch(bus, self.ledger.holds)
        self.control: ControlState | None = None
        self.paces: dict[str, PaceAction] = {}
        self._expiries: list[tuple[int, str]] = []
        self.control_writer = ControlWriter(bus, self._trip_landed)
        self._tasks: list[asyncio.Task] = []
        self._last_prune = 0

    # -- life cycle --

    async def start(self) -> None:
        self._expiries = []
        self.control_writer = ControlWriter(self.bus, self._trip_landed)
        await self.book.open(self.bus)  # again each term: the previous leader may have changed caps
        self.control = await ControlState.open(self.bus)
        self.paces = {tenant: signal.action for tenant, signal in self.control.paces.items()}
        self.journal = Journal(self.bus, self.snapshot_interval_s)
        self.ledger = await self.journal.open()
        self.usage = UsageWatch(self.bus, self.ledger.holds)
        await self.usage.start(read_from_ms(self.ledger.holds))
        for rid, hold in self.ledger.holds.items():
            heapq.heappush(self._expiries, (hold.reservation.expires_ms + self.expiry_grace_ms, rid))
        self._tasks = [
            asyncio.create_task(self.control_writer.run_forever()),
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._pace_forever()),
        ]
        # A crossing whose trip was not recorded before a crash, or a cap lowered in the file.
        self._check_crossings(list(self.ledger.settled))
        # A trip recorded whose switch never landed (control_writes.py): written again.
        for bucket in sorted(self.ledger.trips_unwritten):
            self._write_trip(bucket)

    async def stop(self) -> None:
        for task in self._tasks[1:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.journal is not None:
            await self.journal.close()
        await self.usage.stop()
        # Let queued kill switches and pace signals out before the connection goes.
        await self.control_writer.drain(5)
        if self._tasks:
            self._tasks[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tasks[0]
        if self.control is not None:
            await self.control.close()

    async def abandon(self) -> None:
        """End a term without writing anything more (the lease lost, or the journal fenced)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.journal is not None:
            await self.journal.abandon()
        await self.usage.stop()
        if self.control is not None:
            await self.control.close()

    # -- reserve and settle: decide at once (no await), reply once the journal has the decision --

    def decide_reserve(self, r: Reservation) -> tuple[ReservationDecision, Commit | None]:
        """Check every cap and book the hold, with no await in between.

        Returns the decision and, for a grant, the journal commit to wait for before replying
        (then ``reserve_reply``); a refusal changes nothing and can be sent at once.
        """
        assert self.journal is not None and self.control is not None

        def refuse(reason: str) -> tuple[ReservationDecision, None]:
            return ReservationDecision(id=r.id, granted=False, reason=reason), None

        held = self.ledger.holds.get(r.id)
        if held is not None:  # a retried request: same answer (the grant of what is held), once it is stored
            repeat = ReservationDecision(
                id=r.id, granted=True, reason="already reserved", grant=self.signer.grant(held.reservation)
            )
            return repeat, self.journal.barrier()
        if not self.journal.healthy:  # fail closed: a grant must be stored before it is answered
            return refuse(f"{UNAVAILABLE}: ledger unavailable (the journal refuses writes); retry")
        if r.id in self.ledger.settled_ids:
            return refuse("already settled")
        now = self.clock()
        if r.expires_ms <= now:
            return refuse(f"deadline already passed ({r.expires_ms} <= now {now})")
        try:
            amount = pico(r.amount_usd)
            task_cap = None if r.task_budget_usd is None else pico(r.task_budget_usd)
            # The tenant and key name kill switches if their caps are crossed, so they must be KV key
            # tokens; a tenant token also keeps (tenant, task) keys unambiguous.
            token(r.tenant)
            if r.key_id:
                token(r.key_id)
        except ValueError as exc:
            return refuse(str(exc))
        switch = self.control.blocked(tenant=r.tenant, task_id=r.task_id, model=r.model, key_id=r.key_id)
        if switch is not None:
            key = "" if switch.scope == "global" else f" {switch.key}"
            return refuse(f"kill switch tripped ({switch.scope}{key}): {switch.reason}")
        if task_cap is None:
            task_cap = self.ledger.task_caps.get(task_key(r))
        buckets = buckets_for(r, now, task_capped=task_cap is not None)
        for bucket in buckets:
            cap = task_cap if bucket[0] == "task" else self.book.cap(bucket[0], bucket[1], bucket[2])
            if cap is None:
                continue
            settled, reserved = self.ledger.settled.get(bucket, 0), self.ledger.reserved.get(bucket, 0)
            if settled + reserved + amount > cap:
                return refuse(
                    f"{describe(bucket)} ${dollars(cap):.6f} would be exceeded: settled ${dollars(settled):.6f}"
                    f" + reserved ${dollars(reserved):.6f} + this call ${dollars(amount):.6f}"
                )
        grant = Grant(
            r, amount, now, task_capped=task_cap is not None, task_cap=None if r.task_budget_usd is None else task_cap
        )
        stored = self._record(grant)
        heapq.heappush(self._expiries, (r.expires_ms + self.expiry_grace_ms, r.id))
        return ReservationDecision(id=r.id, granted=True, grant=self.signer.grant(r)), stored

    def reserve_reply(
        self, r: Reservation, decision: ReservationDecision, error: BaseException | None
    ) -> ReservationDecision:
        """The reply to a grant once its journal write finished; withdrawn if it was not stored."""
        if error is None:
            return decision
        # Not durable, so not granted: give the room back.
        if r.id in self.ledger.holds:
            self.usage.take(r.id)
            self._record(Expire(r.id))
        return ReservationDecision(id=r.id, granted=False, reason=f"{UNAVAILABLE}: ledger unavailable: {error}; retry")

    def decide_settle(self, r: Reservation) -> tuple[ReservationDecision, Commit | None]:
        """Replace the hold by the actual cost (no await); returns the journal commit to wait for, if any.

        A settle of a live hold that costs no more than the hold is answered at once: if a crash
        loses its journal write, the hold comes back from the journal and, never settled again, is
        reconciled when it expires: charged the call's metered cost from the usage stream, or its
        worst case without one. It never lets a cap be passed and is never counted twice (a settle
        repeated after the restart finds the hold and replaces it, once). A grant that reuses the
        room this settle frees is answered only once its own commit is stored, which JetStream
        stores after this one. A settle above its hold, or without one, would under-count if lost,
        so it is answered once stored (or once its write failed: it stays queued, retried in order).
        """
        assert self.journal is not None
        if r.id in self.ledger.settled_ids:
            return ReservationDecision(id=r.id, granted=True, reason="already settled"), self.journal.barrier()
        # Unknown usage is never zero: a settle without the actual cost books the worst case.
        try:
            actual = pico(r.amount_usd if r.actual_usd is None else r.actual_usd)
        except ValueError as exc:
            return ReservationDecision(id=r.id, granted=False, reason=str(exc)), None
        now = self.clock()
        hold = self.ledger.holds.get(r.id)
        if hold is not None:
            self.usage.take(r.id)
            buckets, settle = hold.buckets, Settle(r.id, actual, now)
        else:
            buckets = buckets_for(r, now, task_capped=task_key(r) in self.ledger.task_caps)
            settle = Settle(r.id, actual, now, buckets)
        stored = self._record(settle)
        self._check_crossings(buckets)
        self._pace(r.tenant, now)
        answer_now = hold is not None and actual <= hold.amount
        return ReservationDecision(id=r.id, granted=True), None if answer_now else stored

    def settle_reply(
        self, r: Reservation, decision: ReservationDecision, error: BaseException | None
    ) -> ReservationDecision:
        if error is not None:  # booked in memory, and queued: the journal writes it again until it lands
            self.bus.log.warning("settle_journal_retrying", id=r.id, error=str(error))
        return decision

    # -- shared steps --

    def _record(self, op: Op) -> Commit:
        """Apply ``op`` to the ledger and queue it for the journal."""
        assert self.journal is not None
        self.ledger.apply(op)
        return self.journal.append(op)

    def cap_of(self, bucket: Bucket) -> int | None:
        scope, key, window, period = bucket
        if scope == "task":  # its period is its tenant
            return self.ledger.task_caps.get((period, key))
        return self.book.cap(scope, key, window)

    def _check_crossings(self, buckets: list[Bucket]) -> None:
        """Trip the switch of every bucket whose settled spend reached its cap (once per bucket)."""
        now = self.clock()
        for bucket in buckets:
            cap = self.cap_of(bucket)
            spent = self.ledger.settled.get(bucket, 0)
            if cap is None or spent < cap or bucket in self.ledger.tripped or _past(bucket, now):
                continue
            self._record(Trip(bucket))
            self._write_trip(bucket)

    def _write_trip(self, bucket: Bucket) -> None:
        """Queue the kill switch of ``bucket``'s crossed cap (if its period still counts)."""
        now = self.clock()
        if _past(bucket, now):
            return
        # A task's bucket holds its tenant as its period: its switch names both.
        scope, key = bucket[0], task_switch_key(bucket[3], bucket[1]) if bucket[0] == "task" else bucket[1]
        cap, spent = self.cap_of(bucket) or 0, self.ledger.settled.get(bucket, 0)
        reason = f"{describe(bucket)} ${dollars(cap):.6f} reached: settled ${dollars(spent):.6f}"
        self.bus.log.warning("cap_crossed", scope=scope, key=key, reason=reason)
        switch = KillSwitch(
            scope=cast(KillScope, scope), key=key, tripped=True, reason=reason, by="accountant", time_ms=now
        )
        self.control_writer.put(TripWrite(bucket, switch))

    def _trip_landed(self, bucket: Bucket) -> None:
        self._record(TripWritten(bucket))

    # -- expiry --

    async def _sweep_forever(self) -> None:
        await self.usage.ready()  # the costs of restored holds, read before any of them is charged
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.expire_due()

    def expire_due(self) -> None:
        """Reconcile every hold past its deadline (plus grace) that was not settled: its call may have
        run, so it is charged what the usage stream metered for it, else its worst case."""
        now = self.clock()
        charged: list[Bucket] = []
        while self._expiries and self._expiries[0][0] <= now:
            _, rid = heapq.heappop(self._expiries)
            hold = self.ledger.holds.get(rid)
            if hold is None:
                continue
            metered = self.usage.take(rid)
            self._record(Expire(rid, charge=True) if metered is None else Settle(rid, metered, now))
            self.bus.log.info("hold_reconciled", id=rid, metered=metered is not None)
            charged.extend(hold.buckets)
        if charged:
            self._check_crossings(charged)
        if now - self._last_prune >= PRUNE_EVERY_MS:
            self._last_prune = now
            self.ledger.prune(now, keep_ids_ms=KEEP_SETTLED_IDS_MS, keep_tasks_ms=KEEP_IDLE_TASKS_MS)

    # -- pacing --

    async def _pace_forever(self) -> None:
        while True:
            self.pace_all()
            await asyncio.sleep(self.pace_interval_s)

    def pace_all(self) -> None:
        now = self.clock()
        tenants = {key for (scope, key), caps in self.book.caps.items() if scope == "tenant" and caps.month is not None}
        for tenant in tenants | {t for t, action in self.paces.items() if action != "normal"}:
            self._pace(tenant, now)

    def _pace(self, tenant: str, now: int) -> None:
        """Publish the tenant's pace when it changed (only tenants with a month cap leave normal)."""
        cap = self.book.cap("tenant", tenant, "month")
        spend = self.ledger.settled.get(("tenant", tenant, "month", month_period(now)), 0)
        action: PaceAction = "normal" if not cap else pace_action(spend, cap, now, self.config.pacing)
        if action == self.paces.get(tenant, "normal"):
            return
        self.paces[tenant] = action
        expected = curve(cap, now) if cap else 0
        self.control_writer.put(
            PaceSignal(tenant=tenant, action=action, spend_usd=dollars(spend), curve_usd=dollars(expected), time_ms=now)
        )

    # -- configuration --

    async def update(self, update: BudgetUpdate) -> BudgetState:
        try:
            cap = await self.book.update(update)
        except ValueError as exc:
            return BudgetState(error=str(exc), time_ms=self.clock())
        now = self.clock()
        # A cap lowered below what is already spent is crossed now.
        self._check_crossings(
            [(cap.scope, cap.key, "day", day_period(now)), (cap.scope, cap.key, "month", month_period(now))]
        )
        if cap.scope == "tenant":
            self._pace(cap.key, now)
        return self.show(BudgetQuery(scope=cap.scope, key=cap.key))

    def show(self, query: BudgetQuery) -> BudgetState:
        return budget_state(query, self.book, self.ledger, self.cap_of, self.clock())
