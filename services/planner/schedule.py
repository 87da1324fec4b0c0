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
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
from croniter import croniter
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from schemas.messages import Task
from schemas.subjects import BUCKET_SCHEDULES, HEADER_MSG_ID, HEADER_SCHEDULE_RUN, STREAM_TASKS
from services.runtime.bus import Bus, encode, now_ms

# Well inside the TASKS stream's 600 s duplicate window, so every replica's copy of a run is dropped.
CATCH_UP_S = 300.0

# The time the scheduler fires by and attempts are dated by: aware, in UTC. Injected so tests can move it.
WallClock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real ``WallClock``."""
    return datetime.now(UTC)


class Schedule(msgspec.Struct, kw_only=True):
    """A task to submit at every fire time of ``cron`` (UTC), each run with ``timeout_s`` as its deadline."""

    id: str
    cron: str
    # The hard timeout of each run: its task's deadline_s.
    timeout_s: float
    workflow: str
    goal: str
    tenant: str = "default"
    budget_usd: float | None = None
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


async def list_schedules(kv: KeyValue) -> list[Schedule]:
    """Every stored schedule, oldest first."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    schedules = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue  # removed between the listing and the read
        if entry.value is not None:  # typed optional; a deleted key raised KeyNotFoundError above
            schedules.append(msgspec.json.decode(entry.value, type=Schedule))
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
        for schedule in await list_schedules(kv):
            created = datetime.fromtimestamp(schedule.created_ms / 1000, UTC)
            after = max(last, now - timedelta(seconds=CATCH_UP_S), created)
            for fire in schedule.fire_times(after, now):
                task = schedule.task(fire)
                await self.bus.publish(
                    self.subjects.task_submit,
                    task,
                    stream=self.subjects.stream(STREAM_TASKS),
                    headers={HEADER_MSG_ID: task.dedupe_id(), HEADER_SCHEDULE_RUN: task.id},
                )
                self.log.info("schedule_fired", schedule=schedule.id, task_id=task.id)
