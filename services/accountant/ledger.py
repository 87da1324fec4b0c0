"""The accountant's ledger: settled spend and outstanding reservations per budget bucket.

A pure state machine, no I/O. Every change is an operation (``Grant``, ``Settle``, ``Expire``,
``Trip``) that the accountant decides, applies here and appends to its journal; replaying the
journal over the last snapshot rebuilds the same ledger after a restart (``journal.py``).

Money is integer picodollars (the scale of the ClickHouse money columns), so sums and cap
checks are exact whatever the order of calls; amounts are rounded up, never down, on the way in.

A bucket is one cap's counter: ``(scope, key, window, period)``, e.g.
``("tenant", "acme", "day", "2025-11-20")``, ``("global", "*", "month", "2025-11")``,
``("key", "fmk_ab12", "day", "2025-11-20")`` (a gateway's virtual key) or ``("task", "t-1", "task", "acme")``
(a task's cap lasts as long as the task; in place of a period it names the task's tenant, since a task
id is unique only within its tenant: two tenants' tasks of one id each have their own cap). A ledger
written before tasks were keyed by tenant has task buckets with the period "" (and no tenant); they
bind no new call and are forgotten when idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import msgspec

from schemas.messages import Reservation

# One rounding for the ledger and the grants it signs (services/runtime/grants.py).
from services.runtime.grants import PICO as PICO
from services.runtime.grants import pico as pico

Bucket = tuple[str, str, str, str]  # scope, key, window, period
TaskKey = tuple[str, str]  # tenant, task id: a task's cap and spend belong to both


def dollars(amount: int) -> float:
    return amount / PICO


@lru_cache(maxsize=64)
def _periods(day_index: int) -> tuple[str, str]:
    day = datetime.fromtimestamp(day_index * 86_400, tz=UTC)
    return day.strftime("%Y-%m-%d"), day.strftime("%Y-%m")


def day_period(time_ms: int) -> str:
    """The UTC day of ``time_ms``, e.g. 2025-11-20 (cached: every reservation asks)."""
    return _periods(time_ms // 86_400_000)[0]


def month_period(time_ms: int) -> str:
    """The UTC month of ``time_ms``, e.g. 2025-11."""
    return _periods(time_ms // 86_400_000)[1]


def buckets_for(r: Reservation, time_ms: int, *, task_capped: bool) -> list[Bucket]:
    """Every bucket a call of this tenant, model, virtual key and task counts against, in the periods
    of ``time_ms``.

    A call with a key counts against the key's day and month as well as its tenant's: a key is a
    slice of its tenant's budget, never a way around it. Recomputed from the reservation on replay,
    so a journal written before keys existed (``key_id`` empty) rebuilds the same buckets.
    """
    day, month = day_period(time_ms), month_period(time_ms)
    out: list[Bucket] = []
    for scope, key in (("global", "*"), ("tenant", r.tenant), ("model", r.model)):
        out.append((scope, key, "day", day))
        out.append((scope, key, "month", month))
    if r.key_id:
        out.append(("key", r.key_id, "day", day))
        out.append(("key", r.key_id, "month", month))
    if task_capped:
        out.append(("task", r.task_id, "task", r.tenant))
    return out


def task_key(r: Reservation) -> TaskKey:
    return (r.tenant, r.task_id)


# -- operations (the journal's records) --


# Operations are small on purpose (omit_defaults, buckets recomputed rather than stored): every
# granted call writes two of them to the journal.


class Grant(msgspec.Struct, tag="grant", omit_defaults=True):
    reservation: Reservation
    amount: int
    # The decision's time, which fixes the day and month the hold counts against.
    time_ms: int
    # Whether the hold counts against its task's cap too.
    task_capped: bool = False
    # The task's cap as the caller sent it (Reservation.task_budget_usd), in picodollars; it is the
    # cap of the reservation's (tenant, task).
    task_cap: int | None = None

    def buckets(self) -> list[Bucket]:
        return buckets_for(self.reservation, self.time_ms, task_capped=self.task_capped)


class Settle(msgspec.Struct, tag="settle", omit_defaults=True):
    id: str
    actual: int
    time_ms: int
    # None: the buckets of the reservation's hold (the usual case); set for a settle without one.
    buckets: list[Bucket] | None = None


class Expire(msgspec.Struct, tag="expire", omit_defaults=True):
    """A hold ended without a settle. Released (a grant withdrawn before anyone saw it) or, with
    ``charge``, turned into spend at its full amount (it expired unsettled and the usage stream has no
    cost for it: services/accountant/usage_watch.py); a charged id counts as settled."""

    id: str
    charge: bool = False


class Trip(msgspec.Struct, tag="trip"):
    bucket: Bucket


class TripWritten(msgspec.Struct, tag="trip_written"):
    """The switch of a ``Trip`` landed in the control bucket (services/accountant/control_writes.py)."""

    bucket: Bucket


Op = Grant | Settle | Expire | Trip | TripWritten


class HoldRecord(msgspec.Struct, omit_defaults=True):
    reservation: Reservation
    buckets: list[Bucket]
    amount: int
    # The grant's time; 0 in a snapshot written before it was kept.
    time_ms: int = 0


class Snapshot(msgspec.Struct):
    """The whole ledger (the journal stores it with the sequence of the last op it includes).

    ``task_caps`` and ``task_touched`` are (tenant, task, value) triples; a snapshot written before
    tasks were keyed by tenant has them as task -> value objects, which are read as tenant "".
    """

    settled: list[tuple[Bucket, int]]
    holds: list[HoldRecord]
    settled_ids: dict[str, int]
    task_caps: list[tuple[str, str, int]] | dict[str, int]
    task_touched: list[tuple[str, str, int]] | dict[str, int]
    tripped: list[Bucket]
    # Absent from a snapshot written before trips were recorded as landed: read as all landed.
    trips_unwritten: list[Bucket] = []


def _by_task(stored: list[tuple[str, str, int]] | dict[str, int]) -> dict[TaskKey, int]:
    if isinstance(stored, dict):  # before tasks were keyed by tenant
        return {("", task): value for task, value in stored.items()}
    return {(tenant, task): value for tenant, task, value in stored}


@dataclass
class Hold:
    reservation: Reservation
    buckets: list[Bucket]
    amount: int
    # When it was granted (0: unknown, restored from an old snapshot): where the usage stream is read from.
    time_ms: int = 0


@dataclass
class Ledger:
    settled: dict[Bucket, int] = field(default_factory=dict)
    reserved: dict[Bucket, int] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    # Reservation id -> settle time: a repeated settle is recognised and not counted twice.
    settled_ids: dict[str, int] = field(default_factory=dict)
    # (tenant, task) -> the task's cap, the latest one its calls sent.
    task_caps: dict[TaskKey, int] = field(default_factory=dict)
    # Buckets whose cap crossing already tripped the kill switch (once per bucket).
    tripped: set[Bucket] = field(default_factory=set)
    # Of those, the ones whose switch is not known to have landed: the next term writes them again.
    trips_unwritten: set[Bucket] = field(default_factory=set)
    # (tenant, task) -> the latest time (ms) a grant or settle named it, so idle tasks can be forgotten.
    task_touched: dict[TaskKey, int] = field(default_factory=dict)

    def used(self, bucket: Bucket) -> int:
        return self.settled.get(bucket, 0) + self.reserved.get(bucket, 0)

    def apply(self, op: Op) -> None:
        if isinstance(op, Grant):
            self._hold(op.reservation, op.buckets(), op.amount, op.time_ms)
            if op.task_cap is not None:
                self.task_caps[task_key(op.reservation)] = op.task_cap
        elif isinstance(op, Settle):
            hold = self._release(op.id)
            buckets = op.buckets if op.buckets is not None else hold.buckets if hold is not None else []
            for b in buckets:
                self.settled[b] = self.settled.get(b, 0) + op.actual
            self.settled_ids[op.id] = op.time_ms
            self._touch(buckets, op.time_ms)
        elif isinstance(op, Expire):
            hold = self._release(op.id)
            if hold is not None and op.charge:
                for b in hold.buckets:
                    self.settled[b] = self.settled.get(b, 0) + hold.amount
                # Charged is settled: a settle arriving later is a repeat, not a second charge.
                self.settled_ids[op.id] = hold.reservation.expires_ms
        elif isinstance(op, Trip):
            self.tripped.add(op.bucket)
            self.trips_unwritten.add(op.bucket)
        elif isinstance(op, TripWritten):
            self.trips_unwritten.discard(op.bucket)

    def _hold(self, r: Reservation, buckets: list[Bucket], amount: int, time_ms: int) -> None:
        self.holds[r.id] = Hold(r, buckets, amount, time_ms)
        for b in buckets:
            self.reserved[b] = self.reserved.get(b, 0) + amount
        self._touch(buckets, r.expires_ms)

    def _touch(self, buckets: list[Bucket], time_ms: int) -> None:
        for scope, task, _, tenant in buckets:
            if scope == "task":
                key = (tenant, task)
                self.task_touched[key] = max(self.task_touched.get(key, 0), time_ms)

    def _release(self, reservation_id: str) -> Hold | None:
        hold = self.holds.pop(reservation_id, None)
        if hold is not None:
            for b in hold.buckets:
                left = self.reserved[b] - hold.amount
                if left:
                    self.reserved[b] = left
                else:
                    del self.reserved[b]
        return hold

    def prune(self, now_ms: int, *, keep_ids_ms: int, keep_tasks_ms: int) -> None:
        """Forget what no cap can need any more: past days and months, old settle ids, idle tasks.

        Not journaled: a replay that keeps them is only more conservative.
        """
        days = {day_period(now_ms), day_period(now_ms - 86_400_000)}
        months = {month_period(now_ms), month_period(now_ms - 31 * 86_400_000)}
        idle = {t for t, last in self.task_touched.items() if now_ms - last >= keep_tasks_ms}
        idle -= {(b[3], b[1]) for h in self.holds.values() for b in h.buckets if b[0] == "task"}

        def stale(b: Bucket) -> bool:
            scope, key, window, period = b
            if window == "day":
                return period not in days
            if window == "month":
                return period not in months
            return (period, key) in idle

        for b in [b for b in self.settled if stale(b)]:
            del self.settled[b]
            self.tripped.discard(b)
            self.trips_unwritten.discard(b)
        for task in idle:
            self.task_caps.pop(task, None)
            del self.task_touched[task]
        for rid in [r for r, t in self.settled_ids.items() if now_ms - t >= keep_ids_ms]:
            del self.settled_ids[rid]

    def snapshot(self) -> bytes:
        return msgspec.json.encode(
            Snapshot(
                settled=list(self.settled.items()),
                holds=[HoldRecord(h.reservation, h.buckets, h.amount, h.time_ms) for h in self.holds.values()],
                settled_ids=self.settled_ids,
                task_caps=[(tenant, task, cap) for (tenant, task), cap in self.task_caps.items()],
                task_touched=[(tenant, task, time) for (tenant, task), time in self.task_touched.items()],
                tripped=sorted(self.tripped),
                trips_unwritten=sorted(self.trips_unwritten),
            )
        )

    @classmethod
    def restore(cls, data: bytes) -> Ledger:
        snap = msgspec.json.decode(data, type=Snapshot)
        ledger = cls(
            settled=dict(snap.settled),  # msgspec decodes each bucket as its tuple
            settled_ids=dict(snap.settled_ids),
            task_caps=_by_task(snap.task_caps),
            task_touched=_by_task(snap.task_touched),
            tripped=set(snap.tripped),
            trips_unwritten=set(snap.trips_unwritten),
        )
        for h in snap.holds:
            ledger._hold(h.reservation, h.buckets, h.amount, h.time_ms)
        return ledger
