"""Layer 2 across tasks: at most N attempts of the same task per UTC day, whatever replica runs them.

A task's fingerprint is the sha256 of its tenant, workflow, goal and inputs (not its id: a loop
resubmits the same work under new ids), plus, for a scheduled run, the run's id: each run of a
schedule is its own work, bounded by the schedule itself (services/planner/schedule.py). Attempts are counted in the KV bucket
``<prefix>_attempts``, key ``<fingerprint>.<YYYYMMDD>``, and a count only moves by compare-and-set
on the key's revision, so concurrent replicas claiming the last attempt cannot both win. Keys
expire after two days: a day's count is only needed while that UTC day lasts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.messages import Task
from schemas.subjects import Subjects

BUCKET_ATTEMPTS = "attempts"
ATTEMPTS_TTL_S = 2 * 24 * 3600.0


def fingerprint(task: Task, schedule_run: str = "") -> str:
    canonical = [task.tenant, task.workflow, task.goal, [[ref.type, ref.id] for ref in task.inputs], schedule_run]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


async def attempts_bucket(js: JetStreamContext, subjects: Subjects) -> KeyValue:
    name = subjects.bucket(BUCKET_ATTEMPTS)
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=name, history=1, ttl=ATTEMPTS_TTL_S))


class AttemptCounter:
    """Counts attempts per fingerprint and UTC day (``clock``); ``open`` it once connected."""

    def __init__(self, limit: int, clock: Callable[[], datetime]) -> None:
        self.limit = limit
        self.clock = clock
        self.kv: KeyValue | None = None

    async def open(self, js: JetStreamContext, subjects: Subjects) -> None:
        self.kv = await attempts_bucket(js, subjects)

    async def claim(self, task: Task, schedule_run: str = "") -> str | None:
        """Count one attempt of ``task``; the refusal reason instead when today's attempts are used up."""
        day = self.clock().strftime("%Y%m%d")
        key = f"{fingerprint(task, schedule_run)}.{day}"
        while True:
            # Each lost compare-and-set means another replica counted an attempt: read again.
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, b"1")
                    return None
                except KeyWrongLastSequenceError:
                    continue
            count = int(entry.value)
            if count >= self.limit:
                return (
                    f"layer 2 (anti-loop): this task (tenant {task.tenant!r}, workflow {task.workflow!r}, "
                    f"same goal and inputs) already ran {count} times today (UTC {day}); "
                    f"the limit is {self.limit} attempts per day"
                )
            try:
                await self.kv.update(key, str(count + 1).encode(), last=entry.revision)
                return None
            except KeyWrongLastSequenceError:
                continue
