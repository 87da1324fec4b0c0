"""Hostile values in the KV buckets the fuzz of tests/test_fuzz.py leaves out (issue 16, item 8), read
by their real readers on a real nats-server, one module prefix:

- ``<prefix>_schedules``: the planner's ``Scheduler``, ticking on a clock the test moves a minute
  per example, beside a valid schedule that must fire every minute whatever else is stored;
- ``<prefix>_attempts``: the planner's anti-loop ``AttemptCounter``;
- ``<prefix>_task_calls``: the layer-2 ``TaskCallCounter`` of a gateway and of the router (agents);
- ``<prefix>_response_cache``: the router's exact-match ``ResponseCache``.

Each value is either read (and acted on as what it says), or dead-lettered with its reason by that
reader and skipped; the reader goes on: the valid schedule fires, a claim or call is counted afresh,
a cache miss runs the call and its answer is served next time. Payloads: tests/hostile.py; examples
per test as tests/test_fuzz.py (``FRUGALMESH_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import nats
import pytest
from helpers import eventually, make_step
from hostile import counts, decodes, payloads
from hypothesis import assume, given
from hypothesis import strategies as st
from test_fuzz import FUZZ, Letters

from schemas.messages import DeadLetter, InferenceResult, Task, Usage
from schemas.subjects import (
    BUCKET_ATTEMPTS,
    BUCKET_RESPONSE_CACHE,
    BUCKET_SCHEDULES,
    BUCKET_TASK_CALLS,
    KV_API,
    STREAM_DLQ,
)
from services.planner.antiloop import AttemptCounter, fingerprint
from services.planner.schedule import Schedule, Scheduler, schedules_bucket
from services.router.cache import CacheKey, ResponseCache, cache_key
from services.runtime.bus import Bus, now_ms
from services.runtime.settings import MeshSettings
from services.runtime.task_calls import TaskCallCounter, TaskCallRefused, TaskCalls, call_hash
from services.runtime.task_limits import TaskLimits

pytestmark = [pytest.mark.infra, pytest.mark.slow]

TENANT = "fuzz"
LOCAL = "mixtral-8x7b-local"
ATTEMPTS_PER_DAY = 3
# The scheduler's clock starts on a minute and the test moves it by one per example.
START = datetime(2026, 12, 6, 9, 0, 30, tzinfo=UTC)
ids = itertools.count()


@dataclass
class Clock:
    now: datetime

    def read(self) -> datetime:
        return self.now


@dataclass
class Buckets:
    settings: MeshSettings
    nc: nats.NATS
    letters: Letters
    buses: dict[str, Bus]
    clock: Clock
    # Task ids of every run the scheduler submitted (a core subscription on every tenant's submit subject).
    submitted: set[str]

    def subject(self, bucket: str, key: str) -> str:
        """Where a reader of ``bucket`` says a bad value under ``key`` came from."""
        return f"{KV_API}.{self.settings.subjects.bucket(bucket)}.{key}"

    def lettered(self, service: str, subject: str, payload: bytes) -> bool:
        """Whether ``service`` dead-lettered ``payload`` on ``subject`` (whole, or cut when too large)."""
        return any(
            letter.service == service
            and letter.subject == subject
            and (letter.data == payload or (letter.data and payload.startswith(letter.data)))
            for letter in self.letters.received
        )


@pytest.fixture(scope="module")
async def buckets(infra, data_dir) -> AsyncIterator[Buckets]:
    """Buses named as the readers' services, a running scheduler, and every dead letter of the prefix."""
    settings = MeshSettings(
        nats_url=infra.nats_url,
        clickhouse_url=infra.clickhouse_url,
        subject_prefix="fb" + uuid.uuid4().hex[:8],
        data=data_dir,
        log_level="ERROR",
    )
    buses = {name: Bus(settings, name) for name in ("planner", "router", "gateway")}
    for bus in buses.values():
        await bus.connect()
    await buses["planner"].declare_streams()
    nc = await nats.connect(infra.nats_url, drain_timeout=2, **MeshSettings().nats_options())
    letters = Letters()

    async def keep_letter(msg) -> None:
        letters.received.append(msgspec.json.decode(msg.data, type=DeadLetter))

    submitted: set[str] = set()

    async def keep_run(msg) -> None:
        submitted.add(msgspec.json.decode(msg.data, type=Task).id)

    await nc.jetstream().subscribe(
        settings.subjects.dlq_all, stream=settings.subjects.stream(STREAM_DLQ), ordered_consumer=True, cb=keep_letter
    )
    await nc.subscribe(settings.subjects.task_submit_all, cb=keep_run)
    await nc.flush()
    clock = Clock(START)
    scheduling = asyncio.create_task(Scheduler(buses["planner"], clock.read, tick_s=0.05).run())
    yield Buckets(settings, nc, letters, buses, clock, submitted)
    scheduling.cancel()
    for bus in buses.values():
        await bus.close()
    await nc.drain()


def _draw(data: st.DataObject, example: msgspec.Struct, buckets: Buckets) -> bytes:
    """A hostile value around ``example`` small enough for one KV put."""
    value = data.draw(payloads(example), label="value")
    assume(len(value) < buckets.nc.max_payload - 8192)
    return value


# -- schedules: the planner's scheduler --

CANARY = "canary"


def _schedule(key: str) -> Schedule:
    """A schedule stored under ``key`` that fires every minute, created an hour before the clock starts."""
    return Schedule(
        id=key,
        cron="* * * * *",
        timeout_s=60.0,
        workflow="answer",
        goal="a scheduled fuzz run",
        tenant=TENANT,
        created_ms=int((START - timedelta(hours=1)).timestamp() * 1000),
    )


def _not_due(value: bytes, now: datetime) -> bool:
    """Whether ``value`` reads as a schedule created after ``now``: readable, with nothing to fire yet."""
    if not decodes(value, Schedule):
        return False
    return msgspec.json.decode(value, type=Schedule).created_ms > now.timestamp() * 1000


@FUZZ
@given(data=st.data())
async def test_every_unfireable_schedule_is_dead_lettered_and_the_others_still_fire(buckets, data):
    kv = await schedules_bucket(buckets.buses["planner"])
    await kv.put(CANARY, msgspec.json.encode(_schedule(CANARY)))
    key = f"fz{next(ids):06d}"
    value = _draw(data, _schedule(key), buckets)
    await kv.put(key, value)

    buckets.clock.now += timedelta(minutes=1)  # one more fire time, after the value was stored

    minute = int(buckets.clock.now.replace(second=0).timestamp())
    subject = buckets.subject(BUCKET_SCHEDULES, key)
    try:
        await eventually(
            lambda: f"{CANARY}-{minute}" in buckets.submitted,
            message=lambda: f"the valid schedule did not fire at {buckets.clock.now} (minute {minute})",
        )
        if not _not_due(value, buckets.clock.now):
            await eventually(
                lambda: f"{key}-{minute}" in buckets.submitted or buckets.lettered("planner", subject, value),
                message=lambda: f"{value[:200]!r} was neither fired nor dead-lettered",
            )
    finally:
        await kv.purge(key)


# -- attempts: the planner's anti-loop count per task fingerprint and day --

DAY = datetime(2026, 12, 6, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
async def attempts(buckets) -> AttemptCounter:
    counter = AttemptCounter(ATTEMPTS_PER_DAY, lambda: DAY)
    await counter.open(buckets.buses["planner"])
    return counter


def _count(value: bytes) -> int | None:
    """The attempts a stored value counts: a count is one to nine ASCII digits, nothing else."""
    return int(value) if re.fullmatch(rb"[0-9]{1,9}", value) else None


@FUZZ
@given(value=counts)
async def test_every_unreadable_attempt_count_is_dead_lettered_and_counts_nothing(buckets, attempts, value):
    n = next(ids)
    task = Task(id=f"fz{n:06d}", tenant=TENANT, goal=f"attempted work {n}", submitted_ms=now_ms())
    key = f"{fingerprint(task)}.{DAY:%Y%m%d}"
    await attempts.kv.put(key, value)

    refusal = await attempts.claim(task)

    stored = (await attempts.kv.get(key)).value
    count = _count(value)
    if count is not None:
        assert (refusal is not None) == (count >= ATTEMPTS_PER_DAY), (count, refusal)
        assert stored == (value if refusal else str(count + 1).encode())
        return
    assert refusal is None and stored == b"1"
    await buckets.letters.of("planner", buckets.subject(BUCKET_ATTEMPTS, key), value)
    assert await attempts.claim(task) is None  # the reader goes on: the second attempt is counted
    assert (await attempts.kv.get(key)).value == b"2"


# -- task calls: layer 2's call counts per task, at a gateway and at the router --

READERS = {"gateway": "gateway", "agent": "router"}


@pytest.fixture(scope="module")
async def task_calls(buckets) -> dict[str, TaskCallCounter]:
    limits = TaskLimits()
    return {kind: await TaskCallCounter.open(buckets.buses[service], limits, kind) for kind, service in READERS.items()}


@FUZZ
@given(data=st.data())
async def test_every_unreadable_task_call_count_is_dead_lettered_and_counts_nothing(buckets, task_calls, data):
    kind = data.draw(st.sampled_from(sorted(READERS)), label="kind")
    counter = task_calls[kind]
    step = make_step(tenant=TENANT, task_id=f"fz{next(ids):06d}")
    asked = step.role if kind == "agent" else LOCAL
    call = call_hash(asked, step)
    key = f"{kind}.{TENANT}.{step.task_id}"
    value = _draw(data, TaskCalls(calls=1, same={call: 1}), buckets)
    await counter.kv.put(key, value)

    try:
        await counter.admit(step, asked)
        admitted = True
    except TaskCallRefused:
        admitted = False

    if decodes(value, TaskCalls):
        counts = msgspec.json.decode(value, type=TaskCalls)
        over = counts.calls >= counter.max_calls_per_task or counts.same.get(call, 0) >= counter.identical_calls
        assert admitted == (not over), counts
        return
    assert admitted
    await buckets.letters.of(READERS[kind], buckets.subject(BUCKET_TASK_CALLS, key), value)
    assert msgspec.json.decode((await counter.kv.get(key)).value, type=TaskCalls) == TaskCalls(1, {call: 1})
    await counter.admit(step, asked)  # the reader goes on: the same call a second time is counted


# -- the response cache: the router's exact-match answers --


@pytest.fixture(scope="module")
async def cache(buckets) -> ResponseCache:
    bus = buckets.buses["router"]
    bucket = bus.subjects.bucket(BUCKET_RESPONSE_CACHE)
    kv = await bus.key_value(bucket, ttl_s=3600.0)
    return ResponseCache(kv, bus, bucket, bus.log, share_across_tenants=False)


@FUZZ
@given(data=st.data())
async def test_every_unreadable_cached_answer_is_dead_lettered_and_a_miss(buckets, cache, data):
    step = make_step(f"a cached question {next(ids):06d}", tenant=TENANT)
    key = cache_key(LOCAL, step)
    answer = InferenceResult(
        call_id=uuid.uuid4().hex,
        model=LOCAL,
        tier="local",
        provider="local",
        output="42",
        usage=Usage(input_tokens=12, output_tokens=2),
    )
    value = _draw(data, answer, buckets)
    await cache.kv.put(cache.entry(key), value)

    served = await cache.get(key)

    if decodes(value, InferenceResult):
        stored = msgspec.json.decode(value, type=InferenceResult)
        if stored.error is None:
            assert served == stored
            return
    assert served is None
    await buckets.letters.of("router", buckets.subject(BUCKET_RESPONSE_CACHE, cache.entry(key)), value)
    await cache.put(key, answer)  # the miss ran the call: its answer overwrites the entry, served next time
    await eventually(lambda: _served(cache, key, answer), message="the cache did not serve the answer that replaced it")


async def _served(cache: ResponseCache, key: CacheKey, answer: InferenceResult) -> bool:
    return await cache.get(key) == answer
