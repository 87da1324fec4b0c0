"""Layer 2 across tasks: at most N attempts of the same task per UTC day, whatever replica runs them.

A task's fingerprint is the sha256 of its tenant, workflow, goal and inputs (not its id: a loop
resubmits the same work under new ids), plus, for a scheduled run, the run's id: each run of a
schedule is its own work, bounded by the schedule itself (services/planner/schedule.py).
Attempts are counted in the KV bucket ``<prefix>_attempts``, key ``<fingerprint>.<YYYYMMDD>``,
and a count only moves by compare-and-set on the key's revision, so concurrent replicas claiming
the last attempt cannot both win. Keys expire after two days: a day's count is only needed while
that UTC day lasts.

A value that is not a count (ASCII digits, at most ``MAX_COUNT_DIGITS``: a negative count would
give a loop more attempts) is dead-lettered and counts nothing: the claim replaces it with its own
first attempt. Refusing instead would protect nothing (a writer that can garble a count can delete
it) and would stop that work for two days.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.messages import Task
from schemas.subjects import BUCKET_ATTEMPTS
from services.runtime.bus import Bus
from services.runtime.dead_letters import entry_subject

ATTEMPTS_TTL_S = 2 * 24 * 3600.0
MAX_COUNT_DIGITS = 9


def read_count(value: bytes) -> int:
    """The attempts a stored value counts; ValueError when it is not a count."""
    if not value.isdigit() or len(value) > MAX_COUNT_DIGITS:  # bytes.isdigit: ASCII digits only
        raise ValueError(f"not a count of attempts (up to {MAX_COUNT_DIGITS} ASCII digits): {value[:40]!r}")
    return int(value)


def fingerprint(task: Task, schedule_run: str = "") -> str:
    """What makes two tasks the same work: sha256 of tenant, workflow, goal, inputs and scheduled run."""
    canonical = [task.tenant, task.workflow, task.goal, [[ref.type, ref.id] for ref in task.inputs], schedule_run]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


class AttemptCounter:
    """Counts attempts per fingerprint and UTC day (``clock``); ``open`` it once connected."""

    def __init__(self, limit: int, clock: Callable[[], datetime]) -> None:
        self.limit = limit
        self.clock = clock
        self._kv: KeyValue | None = None
        self._bus: Bus | None = None

    async def open(self, bus: Bus) -> None:
        """Use (or create) the attempts bucket of ``bus``'s mesh; before the first ``claim``."""
        self._bus = bus
        self._kv = await bus.key_value(bus.subjects.bucket(BUCKET_ATTEMPTS), history=1, ttl_s=ATTEMPTS_TTL_S)

    @property
    def kv(self) -> KeyValue:
        """The attempts bucket; a claim before ``open`` is a wiring mistake, said as such."""
        if self._kv is None:
            raise RuntimeError("AttemptCounter.open(bus) must run before the first claim")
        return self._kv

    async def claim(self, task: Task, schedule_run: str = "") -> str | None:
        """Count one attempt of ``task``; the refusal reason instead when today's attempts are used up."""
        day = self.clock().strftime("%Y%m%d")
        key = f"{fingerprint(task, schedule_run)}.{day}"
        try:
            # Most work is new today: try to count the first attempt without reading (one round trip).
            await self.kv.create(key, b"1")
            return None
        except KeyWrongLastSequenceError:
            pass
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
            try:
                count = read_count(entry.value or b"")
            except ValueError as exc:
                assert self._bus is not None, "set with the bucket"
                error = f"attempts {key}: {exc}"
                await self._bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)
                count = 0
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
