"""Accountant ingest rate against a bare clickhouse-connect insert of the same rows, in one run.

``python -m loadtest.bench.ingest --json``. Embedded nats-server and ClickHouse on free ports.
N usage events are published to the usage stream first; then the accountant (in this process,
its real app and consumer settings) starts, and the clock runs from its start until it has acked
all N messages, which it does only once their rows are stored (and, as a second figure, from the
end of its start-up, counting only the rows stored after it); then ClickHouse must hold all N,
checked with FINAL and by distinct event id (nothing lost, nothing doubled).
The bare insert writes the same rows, already converted, into a table of the same schema in
another database: once in batches of the accountant's batch size, once as a single insert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats

from schemas.messages import UsageEvent
from schemas.subjects import DURABLE_USAGE_INGEST, HEADER_MSG_ID, STREAM_USAGE
from services.accountant.app import create_app
from services.accountant.clickhouse import client, create_schema
from services.accountant.rows import USAGE, usage_row
from services.embedded.servers import EmbeddedClickHouse, EmbeddedNats
from services.runtime.bus import now_ms
from services.runtime.settings import MeshSettings
from services.runtime.streams import ensure_streams

EVENTS = 100_000
BATCH = 5000  # the accountant's default batch_size


def events(n: int) -> list[UsageEvent]:
    start = now_ms()
    return [
        UsageEvent(
            event_id=uuid.uuid4().hex, time_ms=start + i // 100, tenant=f"tenant{i % 8}", task_id=uuid.uuid4().hex,
            step_id="answer", call_id=uuid.uuid4().hex, service="cloud-inference", tier="frontier",
            provider="openai", model="gpt-4-1106-preview", requested_model="gpt-4-1106-preview",
            input_tokens=500 + i % 300, output_tokens=40 + i % 90, cost_usd=0.0062 + (i % 7) * 1e-6,
            latency_ms=812.5, outcome="ok",
        )
        for i in range(n)
    ]  # fmt: skip


async def publish_all(settings: MeshSettings, batch: list[UsageEvent]) -> float:
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    js = nc.jetstream(publish_async_max_pending=4000)
    await ensure_streams(js, settings.subjects)
    stream = settings.subjects.stream(STREAM_USAGE)
    started = time.perf_counter()
    for event in batch:
        await js.publish_async(
            settings.subjects.usage(event.tenant), msgspec.json.encode(event), stream=stream,
            headers={HEADER_MSG_ID: event.event_id},
        )  # fmt: skip
    await js.publish_async_completed()
    elapsed = time.perf_counter() - started
    info = await js.stream_info(stream)
    await nc.drain()
    assert info.state.messages == len(batch), f"stream holds {info.state.messages} of {len(batch)}"
    return elapsed


def stored(ch, database: str) -> tuple[int, int]:
    row = ch.query(f"SELECT count(), uniqExact(event_id) FROM `{database}`.usage_events FINAL").result_rows[0]
    return int(row[0]), int(row[1])


async def accountant_rate(settings: MeshSettings, n: int, database: str) -> tuple[float, float]:
    ch = client(settings.clickhouse_url)
    create_schema(ch, database)
    app = create_app(settings, database=database, batch_size=BATCH)
    def count() -> int:
        return ch.query(f"SELECT count() FROM `{database}`.usage_events").result_rows[0][0]

    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    js = nc.jetstream()
    stream = settings.subjects.stream(STREAM_USAGE)

    async def all_acked() -> bool:
        # The accountant acks a message only once its row is stored: watching the consumer costs
        # ClickHouse nothing, where polling count() 50 times a second took a tenth of the samples.
        info = await js.consumer_info(stream, DURABLE_USAGE_INGEST)
        return info.num_pending == 0 and info.num_ack_pending == 0

    started = time.perf_counter()
    await app.start()
    # Start-up (connect, schema, clickhouse-connect's numpy/pandas import) is over: the steady part.
    running, at_running = time.perf_counter(), await asyncio.to_thread(count)
    try:
        while not await all_acked():
            await asyncio.sleep(0.02)
        ended = time.perf_counter()
    finally:
        await app.stop()
        await nc.drain()
    rows, distinct = stored(ch, database)
    assert rows == distinct == n, f"accountant stored {rows} rows, {distinct} distinct, of {n}"
    return n / (ended - started), (n - at_running) / (ended - running)


def bare_rates(settings: MeshSettings, batch: list[UsageEvent]) -> tuple[float, float]:
    ch = client(settings.clickhouse_url)
    rows = [usage_row(e) for e in batch]
    rates = []
    for database, size in (("bench_bare_batched", BATCH), ("bench_bare_single", len(rows))):
        create_schema(ch, database)
        started = time.perf_counter()
        for i in range(0, len(rows), size):
            ch.insert(USAGE.table, rows[i : i + size], column_names=list(USAGE.columns), database=database)
        rates.append(len(rows) / (time.perf_counter() - started))
        assert stored(ch, database) == (len(rows), len(rows))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description="Accountant ingest vs a bare clickhouse-connect insert.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    parser.add_argument("--events", type=int, default=EVENTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="frugalmesh-bench-ingest-") as tmp:
        nats_server = EmbeddedNats(Path(tmp) / "nats", port=-1)
        clickhouse = EmbeddedClickHouse(Path(tmp) / "clickhouse", port=0)
        try:
            settings = MeshSettings(
                nats_url=nats_server.start(), clickhouse_url=clickhouse.start(), subject_prefix="benchingest"
            )
            batch = events(args.events)
            publish_s = asyncio.run(publish_all(settings, batch))
            accountant, steady = asyncio.run(accountant_rate(settings, args.events, "bench_accountant"))
            batched, single = bare_rates(settings, batch)
        finally:
            clickhouse.stop()
            nats_server.stop()
    result = {
        "events": args.events,
        "accountant_events_per_s": accountant,
        "accountant_after_startup_events_per_s": steady,
        "bare_insert_batched_events_per_s": batched,
        "bare_insert_single_events_per_s": single,
        "accountant_share_of_bare_batched": accountant / batched,
        "batch_size": BATCH,
        "jetstream_publish_events_per_s": args.events / publish_s,
        "nothing_lost_or_doubled": True,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
