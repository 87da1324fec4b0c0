"""The accountant's ClickHouse ingest: exactly one row per event, whatever JetStream redelivers.

Real nats-server, real embedded ClickHouse. Each test has its own subject prefix and its own
database (named after the prefix), so tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, date, datetime
from decimal import Decimal

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from helpers import eventually, make_request, make_step
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from schemas.messages import Artifact, ArtifactRef, DeadLetter, TaskEvent, Usage, UsageEvent
from schemas.subjects import (
    DURABLE_ARTIFACT_INGEST,
    DURABLE_TASK_INGEST,
    DURABLE_USAGE_INGEST,
    HEADER_MSG_ID,
    STREAM_ARTIFACT_EVENTS,
    STREAM_DLQ,
    STREAM_TASK_EVENTS,
    STREAM_USAGE,
    pull_request,
)
from services.accountant.clickhouse import create_schema
from services.accountant.ingest import BatchConsumer, Ingest, Store, delivery_count
from services.accountant.rows import TASKS, USAGE, usage_row, usd
from services.runtime.bus import Bus
from services.runtime.settings import MeshSettings
from services.runtime.streams import ensure_streams
from services.runtime.usage import usage_event

DAY1_MS = 1_763_596_800_000  # 2025-11-20 00:00 UTC
DAY_MS = 86_400_000

# Short enough that a redelivery after a stop or a failed insert comes within the test.
FAST = {"ack_wait_s": 2.0, "retry_delay_s": 0.2}


@pytest.fixture
def database(settings: MeshSettings) -> str:
    return settings.subject_prefix


def usage(i: int, *, task: str = "task-1", cost: float | None = None, **fields) -> UsageEvent:
    """Call ``i`` of ``task``: even calls on day 1, odd ones on day 2; ``fields`` override."""
    event = {
        "event_id": f"call-{i:05d}",
        "time_ms": DAY1_MS + (i % 2) * DAY_MS + i,
        "tenant": "acme",
        "task_id": task,
        "step_id": "s1",
        "call_id": f"call-{i:05d}",
        "service": "local-inference",
        "tier": "local",
        "provider": "replay",
        "model": "smollm2-135m",
        "requested_model": "smollm2-135m",
        "input_tokens": 100 + i,
        "cached_input_tokens": 10,
        "output_tokens": 20,
        "cost_usd": round(random.uniform(0, 0.01), 9) if cost is None else cost,
        "latency_ms": 12.5,
        "outcome": "ok",
    }
    return UsageEvent(**(event | fields))


async def publish(js, subject: str, data: bytes, msg_id: str | None = None) -> None:
    await js.publish(subject, data, headers={HEADER_MSG_ID: msg_id} if msg_id else None)


async def publish_usage(js, settings: MeshSettings, events: list[UsageEvent], *, suffix: str = "") -> None:
    """Publish pipelined; ``suffix`` makes the Nats-Msg-Id differ so JetStream keeps a re-publish."""
    subjects = settings.subjects
    for start in range(0, len(events), 200):
        await asyncio.gather(
            *(
                publish(js, subjects.usage(e.tenant), msgspec.json.encode(e), e.event_id + suffix)
                for e in events[start : start + 200]
            )
        )


async def store_and_crash_unacked(js, settings: MeshSettings, ch, database: str, n: int) -> None:
    """The crash window of an accountant: it fetched ``n`` usage messages on the durable, stored
    their rows in ClickHouse and died before acking them (they come back once FAST's ack wait ends)."""
    crashed = await js.pull_subscribe(
        settings.subjects.usage_all, DURABLE_USAGE_INGEST, stream=settings.subjects.stream(STREAM_USAGE),
        config=ConsumerConfig(ack_wait=FAST["ack_wait_s"], max_ack_pending=4000),
    )  # fmt: skip
    fetched = await crashed.fetch(n, timeout=5)
    create_schema(ch, database)
    rows = [usage_row(msgspec.json.decode(m.data, type=UsageEvent)) for m in fetched]
    ch.insert("usage_events", rows, column_names=list(USAGE.columns), database=database)
    await crashed.unsubscribe()


async def drained(js, stream: str, durable: str, timeout_s: float = 20.0) -> None:
    """Wait until the consumer has nothing pending and nothing unacked."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = await js.consumer_info(stream, durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{durable} on {stream} did not drain: {info}")


def stored(ch: Client, database: str, *, final: bool = False) -> tuple[int, int, Decimal]:
    """(rows, distinct event ids, total cost) of usage_events: without FINAL the raw truth, with it
    what every view reads."""
    rows, ids, cost = ch.query(
        f"SELECT count(), uniqExact(event_id), sum(cost_usd) FROM {database}.usage_events{' FINAL' if final else ''}"
    ).result_rows[0]
    return rows, ids, cost


async def start_accountant(start_service, settings: MeshSettings, database: str, **options):
    return await start_service("accountant", settings, database=database, **FAST, **options)


@pytest.mark.infra
async def test_duplicates_make_exactly_one_row_each(start_service, settings, database, ch, nc):
    js = nc.jetstream()
    await start_accountant(start_service, settings, database)
    stream = settings.subjects.stream(STREAM_USAGE)
    events = [usage(i) for i in range(300)]

    total = sum(usd(e.cost_usd) for e in events)

    # First wave, with some events published twice inside it under a new msg id (in-batch dupes).
    await publish_usage(js, settings, events)
    await publish_usage(js, settings, events[:40], suffix="-retry")
    # The same msg id again: JetStream's dedupe window drops these before the accountant.
    await publish_usage(js, settings, events[:50])
    await drained(js, stream, DURABLE_USAGE_INGEST)
    assert stored(ch, database) == (300, 300, total)

    # Second wave: already-stored ids under new msg ids, as a producer's retry after the stream's
    # dedupe window would be: a first delivery, not looked up, so a second copy may be stored;
    # the key's ReplacingMergeTree keeps it out of every read with FINAL, which is what views read.
    await publish_usage(js, settings, events[100:160], suffix="-late")
    await drained(js, stream, DURABLE_USAGE_INGEST)

    info = await js.stream_info(stream)
    assert info.state.messages == 300 + 40 + 60
    assert stored(ch, database, final=True) == (300, 300, total)
    assert ch.query(f"SELECT sum(cost_usd) FROM {database}.spend_daily").result_rows[0][0] == total
    assert ch.query(
        f"SELECT toUnixTimestamp64Milli(time), tenant, task_id, call_id, input_tokens, cached_input_tokens, "
        f"output_tokens, latency_ms, outcome, usage_source FROM {database}.usage_events WHERE event_id = 'call-00007'"
    ).result_rows == [(events[7].time_ms, "acme", "task-1", "call-00007", 107, 10, 20, 12.5, "ok", "provider")]


@pytest.mark.infra
async def test_bad_messages_go_to_the_dlq_and_ingest_goes_on(start_service, settings, database, ch, nc):
    js = nc.jetstream()
    subjects = settings.subjects
    await start_accountant(start_service, settings, database)
    usage_subject = subjects.usage("acme")
    bad = [
        b"not json",
        b'{"v": 1, "event_id": "x"}',  # required fields missing
        msgspec.json.encode(usage(900, output_tokens=-5)),  # past the schema's bound (and no column holds it)
        msgspec.json.encode(usage(901, cost=1e300)),  # past the schema's bound (and Decimal(18, 12)'s range)
    ]
    for i, data in enumerate(bad):
        await publish(js, usage_subject, data, f"bad-{i}")
    good = [usage(i) for i in range(50)]
    await publish_usage(js, settings, good)
    await drained(js, subjects.stream(STREAM_USAGE), DURABLE_USAGE_INGEST)

    assert stored(ch, database) == (50, 50, sum(usd(e.cost_usd) for e in good))
    dlq = await js.pull_subscribe(subjects.dlq("accountant"), stream=subjects.stream(STREAM_DLQ))
    letters = [msgspec.json.decode(m.data, type=DeadLetter) for m in await dlq.fetch(len(bad), timeout=5)]
    assert sorted(letter.data for letter in letters) == sorted(bad)
    assert all(letter.service == "accountant" and letter.subject == usage_subject for letter in letters)
    errors = {letter.data: letter.error for letter in letters}
    assert errors[bad[0]].startswith("UsageEvent:")
    assert errors[bad[2]] == "UsageEvent: Expected `int` >= 0 - at `$.output_tokens`"
    assert errors[bad[3]] == "UsageEvent: Expected `float` <= 1000000000.0 - at `$.cost_usd`"


@pytest.mark.infra
async def test_stop_and_restart_mid_stream_loses_and_doubles_nothing(start_service, settings, database, ch, nc):
    js = nc.jetstream()
    stream = settings.subjects.stream(STREAM_USAGE)
    # Small batches so the stop lands between (or inside) many inserts.
    first = await start_accountant(start_service, settings, database, batch_size=50)
    events = [usage(i, task=f"task-{i % 7}") for i in range(3000)]
    publishing = asyncio.create_task(publish_usage(js, settings, events))
    await eventually(lambda: stored(ch, database)[0] >= 300, timeout_s=20)
    await asyncio.wait_for(first.stop(), 10)
    at_stop = stored(ch, database)[0]
    await publishing
    assert at_stop < len(events), "the stop came too late to test anything"

    await start_accountant(start_service, settings, database, batch_size=50)
    await drained(js, stream, DURABLE_USAGE_INGEST)
    assert stored(ch, database) == (3000, 3000, sum(usd(e.cost_usd) for e in events))


@pytest.mark.infra
async def test_rows_inserted_but_never_acked_are_not_doubled(start_service, settings, database, ch, nc):
    """The crash window: a batch reached ClickHouse but its acks did not reach JetStream."""
    js = nc.jetstream()
    events = [usage(i) for i in range(100)]
    stream = settings.subjects.stream(STREAM_USAGE)
    await ensure_streams(js, settings.subjects)
    await publish_usage(js, settings, events)
    # A first accountant fetched 60 messages on the durable, stored their rows and died unacked.
    await store_and_crash_unacked(js, settings, ch, database, 60)

    # The restarted accountant keeps the durable: the 40 never fetched come first, the 60 come
    # back as redeliveries once their ack wait ends, and those are looked up before the insert.
    await start_accountant(start_service, settings, database)
    await drained(js, stream, DURABLE_USAGE_INGEST)
    assert stored(ch, database) == (100, 100, sum(usd(e.cost_usd) for e in events))


@pytest.mark.infra
async def test_failed_insert_is_redelivered(start_service, settings, database, ch, nc):
    js = nc.jetstream()
    stream = settings.subjects.stream(STREAM_USAGE)
    await start_accountant(start_service, settings, database)
    ch.command(f"DROP TABLE {database}.usage_events")
    events = [usage(i) for i in range(200)]
    await publish_usage(js, settings, events)
    # The insert fails, the batch is naked and comes back again and again.
    await eventually(lambda: _redelivered(js, stream), timeout_s=20)
    assert (await js.consumer_info(stream, DURABLE_USAGE_INGEST)).num_ack_pending > 0
    create_schema(ch, database)
    await drained(js, stream, DURABLE_USAGE_INGEST)
    assert stored(ch, database) == (200, 200, sum(usd(e.cost_usd) for e in events))


async def _redelivered(js, stream: str) -> bool:
    return (await js.consumer_info(stream, DURABLE_USAGE_INGEST)).num_redelivered > 0


@pytest.mark.infra
async def test_task_outcomes_artifacts_and_views(start_service, settings, database, ch, nc):
    js = nc.jetstream()
    subjects = settings.subjects
    await start_accountant(start_service, settings, database)

    answer = Artifact(
        id="a" * 64,
        type="answer",
        task_id="task-1",
        step_id="s2",
        calls=["call-00000", "call-00001"],
        parents=["b" * 64],
        body={"text": "42"},
        cost_usd=0.003,
        created_ms=DAY1_MS + 5,
    )
    notes = Artifact(
        id="b" * 64, type="notes", task_id="task-1", step_id="s1", body={}, cost_usd=0.001, created_ms=DAY1_MS
    )
    for i, artifact in enumerate([answer, notes, answer]):  # the answer announced twice
        await publish(js, subjects.artifact_created(artifact.type), msgspec.json.encode(artifact), f"art-{i}")

    def task_event(task: str, kind: str, **fields) -> TaskEvent:
        return TaskEvent(task_id=task, kind=kind, time_ms=DAY1_MS + 10, tenant="acme", workflow="answer", **fields)

    progress = [task_event("task-1", "accepted"), task_event("task-1", "planned"), task_event("task-1", "step_done")]
    done = task_event(
        "task-1",
        "done",
        artifact=ArtifactRef(id=answer.id, type="answer"),
        cost_usd=0.004,
        calls=3,
        detail="ok",
        history=progress,
    )
    task_events = [
        done,
        done,  # a replayed terminal event
        task_event("task-2", "failed", detail="provider down", calls=1, cost_usd=0.0, agent="critic"),
    ]
    for i, event in enumerate(task_events):
        subject = subjects.task_event(event.tenant, event.task_id, event.kind)
        await publish(js, subject, msgspec.json.encode(event), f"te-{i}")

    calls = [
        usage(0, cost=0.001),  # day 1
        usage(1, cost=0.002, cached_input_tokens=50),  # day 2
        usage(2, cost=0.0, outcome="cache_hit"),  # day 1
        usage(3, task="task-2", cost=0.0005, outcome="error", usage_source="estimated"),  # day 2
    ]
    await publish_usage(js, settings, calls)
    for stream, durable in (
        (STREAM_ARTIFACT_EVENTS, DURABLE_ARTIFACT_INGEST),
        (STREAM_TASK_EVENTS, DURABLE_TASK_INGEST),
        (STREAM_USAGE, DURABLE_USAGE_INGEST),
    ):
        await drained(js, subjects.stream(stream), durable)

    assert ch.query(
        f"SELECT id, type, schema_version, task_id, step_id, calls, parents, cost_usd, toUnixTimestamp64Milli(created) "
        f"FROM {database}.artifacts ORDER BY id"
    ).result_rows == [
        (answer.id, "answer", 1, "task-1", "s2", answer.calls, answer.parents, Decimal("0.003"), DAY1_MS + 5),
        (notes.id, "notes", 1, "task-1", "s1", [], [], Decimal("0.001"), DAY1_MS),
    ]
    assert ch.query(
        f"SELECT task_id, kind, tenant, workflow, cost_usd, calls, detail, artifact_id, artifact_type, agent "
        f"FROM {database}.task_events ORDER BY task_id"
    ).result_rows == [
        ("task-1", "done", "acme", "answer", Decimal("0.004"), 3, "ok", answer.id, "answer", ""),
        ("task-2", "failed", "acme", "answer", Decimal(0), 1, "provider down", "", "", "critic"),
    ]

    day1, day2 = date(2025, 11, 20), date(2025, 11, 21)
    assert ch.query(
        f"SELECT day, tenant, model, tier, calls, input_tokens, cached_input_tokens, output_tokens, cost_usd "
        f"FROM {database}.spend_daily ORDER BY day"
    ).result_rows == [
        (day1, "acme", "smollm2-135m", "local", 2, 100 + 102, 20, 40, Decimal("0.001")),
        (day2, "acme", "smollm2-135m", "local", 2, 101 + 103, 60, 40, Decimal("0.0025")),
    ]
    assert ch.query(
        f"SELECT day, calls, cache_hits, cache_hit_share, input_tokens, cached_input_tokens, cached_input_share "
        f"FROM {database}.cache_hit_daily ORDER BY day"
    ).result_rows == [
        (day1, 2, 1, 0.5, 202, 20, 20 / 202),
        (day2, 2, 0, 0.0, 204, 60, 60 / 204),
    ]
    assert ch.query(
        f"SELECT task_id, calls, input_tokens, cached_input_tokens, output_tokens, total_tokens, "
        f"largest_call_tokens, cost_usd FROM {database}.task_tokens ORDER BY task_id"
    ).result_rows == [
        ("task-1", 3, 303, 70, 60, 363, 122, Decimal("0.003")),
        ("task-2", 1, 103, 10, 20, 123, 123, Decimal("0.0005")),
    ]
    assert ch.query(
        f"SELECT task_id, artifact_id, artifact_type, reported_calls, reported_cost_usd, metered_calls, "
        f"metered_cost_usd FROM {database}.completed_artifact_cost"
    ).result_rows == [("task-1", answer.id, "answer", 3, Decimal("0.004"), 3, Decimal("0.003"))]


@pytest.mark.infra
async def test_schema_creation_is_idempotent(ch, database):
    assert create_schema(ch, database) == database
    assert create_schema(ch, database) == database
    names = {row[0] for row in ch.query(f"SHOW TABLES FROM {database}").result_rows}
    assert names == {
        "usage_events",
        "task_events",
        "artifacts",
        "kill_events",
        "alerts",
        "feedback",
        "budget_changes",
        "spend_daily",
        "completed_artifact_cost",
        "cache_hit_daily",
        "task_tokens",
        "key_spend_daily",
        "call_feedback",
        "usage_minute",
        "usage_minute_mv",
        "task_usage",
        "task_usage_mv",
    }


@pytest.mark.infra
def test_existing_tables_gain_key_id_and_agent_in_place(ch, database):
    # Tables from before spilled_from, key_id, agent and ttft_ms (and the aggregates that read ttft_ms): they
    # come back, in a new table's column order.
    create_schema(ch, database)
    for name in ("usage_minute_mv", "usage_minute", "task_usage_mv", "task_usage"):
        ch.command(f"DROP TABLE {database}.{name}")
    ch.command(
        f"ALTER TABLE {database}.usage_events DROP COLUMN spilled_from, DROP COLUMN key_id, DROP COLUMN agent, "
        "DROP COLUMN ttft_ms"
    )
    ch.command(f"ALTER TABLE {database}.task_events DROP COLUMN agent")
    ch.command(f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('old', now())")
    ch.command(f"INSERT INTO {database}.task_events (task_id, kind) VALUES ('old', 'done')")
    create_schema(ch, database)
    columns = [row[0] for row in ch.query(f"DESCRIBE TABLE {database}.usage_events").result_rows]
    assert columns == list(USAGE.columns) and columns[-3:] == ["key_id", "agent", "ttft_ms"]
    assert ch.query(f"SELECT spilled_from, key_id, agent, ttft_ms FROM {database}.usage_events").result_rows == [
        ("", "", "", 0.0)
    ]
    columns = [row[0] for row in ch.query(f"DESCRIBE TABLE {database}.task_events").result_rows]
    assert columns == list(TASKS.columns) and columns[-1] == "agent"
    assert ch.query(f"SELECT agent FROM {database}.task_events").result_rows == [("",)]


@pytest.mark.infra
async def test_usage_rows_carry_the_virtual_key(start_service, settings, database, ch, nc):
    """The row builder copies key_id from the step (router rows) or the request (inference rows);
    ClickHouse sums spend per key."""
    js = nc.jetstream()
    await start_accountant(start_service, settings, database)
    ended = {"service": "cloud-inference", "tier": "mid", "provider": "together", "model": "mixtral-8x7b",
             "requested_model": "mixtral-8x7b", "usage": Usage(input_tokens=100, output_tokens=20),
             "latency_ms": 5.0, "outcome": "ok"}  # fmt: skip
    request = make_request("mixtral-8x7b", "hi")
    events = [
        usage_event(make_step(key_id="fmk_a"), "call-a1", cost_usd=0.001, **ended),
        usage_event(msgspec.structs.replace(request, key_id="fmk_a"), "call-a2", cost_usd=0.002, **ended),
        usage_event(msgspec.structs.replace(request, key_id="fmk_b"), "call-b1", cost_usd=0.004, **ended),
        usage_event(make_step(), "call-none", cost_usd=0.008, **ended),  # not a gateway call
    ]
    assert [e.key_id for e in events] == ["fmk_a", "fmk_a", "fmk_b", ""]
    await publish_usage(js, settings, events)
    await publish_usage(js, settings, events[:2], suffix="-again")  # redelivered: still one row each
    await drained(js, settings.subjects.stream(STREAM_USAGE), DURABLE_USAGE_INGEST)

    assert ch.query(
        f"SELECT key_id, sum(cost_usd) FROM {database}.usage_events FINAL GROUP BY key_id ORDER BY key_id"
    ).result_rows == [("", Decimal("0.008")), ("fmk_a", Decimal("0.003")), ("fmk_b", Decimal("0.004"))]
    today = datetime.fromtimestamp(events[0].time_ms / 1000, UTC).date()
    assert ch.query(
        f"SELECT day, tenant, key_id, calls, input_tokens, output_tokens, cost_usd "
        f"FROM {database}.key_spend_daily ORDER BY key_id"
    ).result_rows == [
        (today, "acme", "fmk_a", 2, 200, 40, Decimal("0.003")),
        (today, "acme", "fmk_b", 1, 100, 20, Decimal("0.004")),
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.frugalmesh_usage.accountant.3.1021.998.1764572400000000000.12",
        "$JS.ACK.hub.ACCHASH.frugalmesh_usage.accountant.3.1021.998.1764572400000000000.12.rand0",
    ],
    ids=["ack subject", "ack subject with domain"],
)
def test_delivery_count_reads_the_ack_subject_as_nats_py_does(reply):
    assert delivery_count(reply) == Msg.Metadata._from_reply(reply).num_delivered == 3


@pytest.mark.infra
async def test_stop_ends_the_fetch_loop_even_as_a_message_arrives(settings, nc):
    """Python 3.11's ``asyncio.wait_for`` drops a cancellation that lands as its wait ends; the
    ingest's fetch loop waited that way, so a stop during a stream of messages could hang."""
    bus = Bus(settings, "accountant")
    await bus.connect()
    await ensure_streams(bus.jetstream, settings.subjects)
    ingest = Ingest(bus, Store(settings.clickhouse_url, None), USAGE, retry_delay_s=1.0)
    consumer = BatchConsumer(ingest, bus.pull(
        stream=settings.subjects.stream(STREAM_USAGE), subject=settings.subjects.usage_all,
        durable="stop-test", batch_size=10, batch_timeout_s=5.0, config=ConsumerConfig(),
    ))  # fmt: skip
    # The fetch loop sends its pull request, then waits: once the request is on the wire, it waits.
    pulls = await nc.subscribe(pull_request(settings.subjects.stream(STREAM_USAGE), "stop-test"))
    await nc.flush()
    await consumer.start()
    try:
        await pulls.next_msg(timeout=5)
        consumer.pull._arrived.set()  # what a message's arrival does, in the same turn as the stop
        stopping = asyncio.create_task(consumer.stop())
        # Well inside the pull's 5 s: a lost cancellation kept the loop fetching for good.
        done, _ = await asyncio.wait([stopping], timeout=2)
        assert stopping in done, "stop() did not end the fetch loop"
    finally:
        await bus.close()
