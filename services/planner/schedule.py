"""Scheduled tasks (layer 1): a cron expression, a task to submit, and a hard timeout per run.

Schedules live in the KV bucket ``<prefix>_schedules`` (key = schedule id), written by
``frugalmesh schedule add|remove``. Every planner replica runs a ``Scheduler``: each tick it reads
the schedules and, for every cron fire time since its previous tick, submits the schedule's Task
with ``deadline_s`` = the schedule's timeout. The task id is ``<schedule id>-<fire time in epoch
seconds>`` and its ``Nats-Msg-Id`` ``<tenant>.<task id>`` (``Task.dedupe_id``, as every submitter
sends), so JetStream drops the copies other replicas submit of the same run (the TASKS stream's
duplicate window is 600 s): each run fires exactly once.

Cron expressions are read in UTC. A fire time more than ``CATCH_UP_S`` old (a planner that was
down, a tick that failed) is skipped rather than caught up: a burst of late runs is how a bill runs
away, and past the duplicate window a replica could no longer be sure it is the only one firing it.

A scheduled run carries ``Mesh-Schedule-Run`` (its task id): layer 2 counts each run as its own
piece of work, so a schedule that fires every five minutes is not refused after three runs a day.

A stored value that is not a schedule the scheduler can fire (not a ``Schedule``, stored under
another key than its id, a cron expression croniter refuses or that never fires, a run that would
not be a valid ``Task``) is dead-lettered by each replica once per revision and skipped; the other
schedules fire as usual. ``frugalmesh schedule list`` shows only the readable ones.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
from croniter import croniter
from msgspec import Meta
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from schemas.messages import MAX_DEADLINE_S, Task, Usd
from schemas.subjects import BUCKET_SCHEDULES, HEADER_MSG_ID, HEADER_SCHEDULE_RUN, STREAM_TASKS, token
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.dead_letters import UNREADABLE, entry_subject
from services.runtime.kv_snapshot import current_entries

# Well inside the TASKS stream's 600 s duplicate window, so every replica's copy of a run is dropped.
CATCH_UP_S = 300.0

# How long reading the schedules may wait for the next value before the tick gives up (and is tried again).
READ_TIMEOUT_S = 5.0

# What reading a stored value as a schedule it can fire raises: croniter's errors are ValueErrors, and a
# creation time past datetime's range an OverflowError or OSError.
UNFIREABLE = (*UNREADABLE, ValueError, OverflowError, OSError)

# The time the scheduler fires by and attempts are dated by: aware, in UTC. Injected so tests can move it.
WallClock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real ``WallClock``."""
    return datetime.now(UTC)


class Schedule(msgspec.Struct, kw_only=True):
    """A task to submit at every fire time of ``cron`` (UTC), each run with ``timeout_s`` as its deadline."""

    id: str
    cron: str
    # The hard timeout of each run: its task's deadline_s (the bounds refuse JSON's 1e999, infinity).
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_DEADLINE_S)]
    workflow: str
    goal: str
    tenant: str = "default"
    budget_usd: Usd | None = None
    created_ms: int

    def fire_times(self, after: datetime, until: datetime) -> list[datetime]:
        """Fire times in ``(after, until]``, in order."""
        times = croniter(self.cron, after).all_next(datetime)
        fires: list[datetime] = []
        for fire in times:
            if fire > until:
                return fires
            fires.append(fire)
        return fires

    def task(self, fire: datetime) -> Task:
        """The run that fires at ``fire``: its id names the schedule and the fire time, so copies dedupe."""
        return Task(
            id=f"{self.id}-{int(fire.timestamp())}",
            tenant=self.tenant,
            workflow=self.workflow,
            goal=self.goal,
            budget_usd=self.budget_usd,
            deadline_s=self.timeout_s,
            submitted_ms=now_ms(),
        )


def new_schedule_id() -> str:
    """A fresh schedule id, short enough to type into ``frugalmesh schedule remove``."""
    return "s" + uuid.uuid4().hex[:12]


async def schedules_bucket(bus: Bus) -> KeyValue:
    """The KV bucket of ``bus``'s mesh that holds its schedules (created on first use)."""
    return await bus.key_value(bus.subjects.bucket(BUCKET_SCHEDULES), history=1)


async def add_schedule(kv: KeyValue, schedule: Schedule) -> None:
    """Store ``schedule`` (a schedule with the same id is replaced); planners fire it from their next tick."""
    await kv.put(schedule.id, encode(schedule))


def read_schedule(entry: KeyValue.Entry) -> Schedule:
    """The schedule stored in ``entry``; one of ``UNFIREABLE`` when it is not one the scheduler can fire."""
    schedule = msgspec.json.decode(entry.value or b"", type=Schedule)
    if schedule.id != entry.key:
        raise ValueError(f"the schedule is {schedule.id!r}, stored under {entry.key!r}")
    token(schedule.id)  # its runs' task ids are <id>-<fire time>
    token(schedule.tenant)
    created = datetime.fromtimestamp(schedule.created_ms / 1000, UTC)
    croniter(schedule.cron, created).get_next(datetime)  # refuses a bad expression, or one that never fires
    # Its runs must be tasks the planner takes (id and field bounds, a finite timeout and budget).
    msgspec.json.decode(encode(schedule.task(created)), type=Task)
    return schedule


async def schedule_entries(bus: Bus, kv: KeyValue) -> list[KeyValue.Entry]:
    """The stored value of every schedule, readable or not, all of them: a schedule missing from one
    tick's reading would lose that tick's runs. nats-py's ``keys()`` can miss keys or, when a write
    replaces a value while it reads, wait until the next write; ``current_entries`` counts the keys
    instead, and gives up (raising TimeoutError, so the tick is tried again) after ``READ_TIMEOUT_S``."""
    watcher = await kv.watchall()
    try:
        bucket = bus.subjects.bucket(BUCKET_SCHEDULES)
        latest = {entry.key: entry async for entry in current_entries(bus, bucket, watcher, READ_TIMEOUT_S)}
    finally:
        await watcher.stop()
    return [entry for entry in latest.values() if entry.operation is None]  # a removed schedule is a marker


async def list_schedules(bus: Bus) -> list[Schedule]:
    """Every readable stored schedule, oldest first (the planners dead-letter the others)."""
    schedules = []
    for entry in await schedule_entries(bus, await schedules_bucket(bus)):
        try:
            schedules.append(read_schedule(entry))
        except UNFIREABLE:
            continue
    return sorted(schedules, key=lambda s: (s.created_ms, s.id))


async def remove_schedule(kv: KeyValue, schedule_id: str) -> bool:
    """Remove a schedule; False when there was none with this id."""
    try:
        await kv.get(schedule_id)
    except KeyNotFoundError:
        return False
    await kv.purge(schedule_id)
    return True


class Scheduler:
    """Submits each schedule's runs; ``clock`` and ``tick_s`` are injectable so tests can move time."""

    def __init__(self, bus: Bus, clock: WallClock, tick_s: float) -> None:
        self.bus = bus
        self.subjects = bus.subjects
        self.log = bus.log
        self.clock = clock
        self.tick_s = tick_s
        # (key, revision) of the unfireable values already dead-lettered: each is kept once, not every tick.
        self._refused: set[tuple[str, int]] = set()

    async def run(self) -> None:
        """Tick until cancelled: each tick submits the runs whose fire time came since the last one."""
        kv = await schedules_bucket(self.bus)
        last = self.clock()
        while True:
            await asyncio.sleep(self.tick_s)
            now = self.clock()
            try:
                await self._fire(kv, last, now)
            except Exception:
                # The bus is briefly away: the next tick covers this one's runs (dedupe drops repeats).
                self.log.exception("schedule_tick_failed")
                continue
            last = now

    async def _fire(self, kv: KeyValue, last: datetime, now: datetime) -> None:
        entries = await schedule_entries(self.bus, kv)
        self._refused &= {(entry.key, entry.revision or 0) for entry in entries}
        for entry in entries:
            try:
                schedule = read_schedule(entry)
                created = datetime.fromtimestamp(schedule.created_ms / 1000, UTC)
                fires = schedule.fire_times(max(last, now - timedelta(seconds=CATCH_UP_S), created), now)
            except UNFIREABLE as exc:
                await self._refuse(entry, exc)
                continue
            for fire in fires:
                task = schedule.task(fire)
                await self.bus.publish(
                    self.subjects.task_submit(task.tenant),
                    task,
                    stream=self.subjects.stream(STREAM_TASKS),
                    headers={HEADER_MSG_ID: task.dedupe_id(), HEADER_SCHEDULE_RUN: task.id},
                )
                self.log.info("schedule_fired", schedule=schedule.id, task_id=task.id)

    async def _refuse(self, entry: KeyValue.Entry, exc: Exception) -> None:
        if (entry.key, entry.revision or 0) in self._refused:
            return
        self._refused.add((entry.key, entry.revision or 0))
        error = f"schedule {entry.key}: {exc}"
        await self.bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)
