"""Mesh overhead per call against the raw NATS request/reply round trip, measured in one run.

``python -m loadtest.bench.overhead --json``. A private stack (embedded nats-server and
ClickHouse, the six services as processes) runs the load-test deploy with the latency model off,
so the synthetic backend answers at once. Three measurements:

- raw NATS: a nats-py requester and an echo responder in this process, one request at a time;
- overhead: single-step ``answer`` tasks (64-token prompt, 16 tokens out) at a gentle open-loop
  rate; per task, end-to-end time (publish to terminal event) minus the backend time the
  inference service metered in its usage row;
- throughput: the same tasks open loop at rising rates; a rate is sustained when every task ends
  done, every call has its one usage row, and the tasks finish within 10% of the send time. For
  each rate, the CPU time every process of the stack (and this one, the load generator) used per
  task: what bounds the rate on a machine of N cores is N seconds of CPU a second;
- messages: last, at 50 tasks/s, every message nats-server routes to a ``>`` subscriber (it sees
  them all: JetStream API requests, replies, acks, and each JetStream delivery to a consumer,
  which carries the stored message's own subject) per task, by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import sys
import time

import nats

from loadtest.bench.common import bench_stack, cpu_seconds_by_process, zero_latency_models
from loadtest.replay import ReplayOptions, replay
from loadtest.stats import percentiles
from loadtest.traces import TraceRow
from schemas.subjects import INBOX, JS_ACK, JS_API, JS_EVENT, KV_API, OBJECT_STORE_API, Subjects
from services.runtime.settings import MeshSettings

RATES = (250, 500, 1000)
RATE_SECONDS = 4.0
# A task not done by then counts against the rate; it also bounds the benchmark's run time.
DEADLINE_S = 30.0


async def nats_round_trip(settings: MeshSettings, n: int = 2000) -> dict:
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    subject = settings.subjects.bench_echo

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    payload = b"x" * 512  # about a StepRequest's size
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await nc.request(subject, payload, timeout=5)
        times.append((time.perf_counter() - start) * 1000)
    await nc.drain()
    p = percentiles(times)
    return {"p50": p.p50, "p95": p.p95, "p99": p.p99}


async def bus_messages_per_task(settings: MeshSettings, n: int = 200) -> dict[str, float]:
    """Messages nats-server routes per single-step task, counted by a ``>`` subscriber, by kind."""
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    counts: collections.Counter[str] = collections.Counter()

    async def count(msg) -> None:
        counts[message_kind(msg.subject, settings.subject_prefix)] += 1

    await nc.subscribe(">", cb=count)
    await nc.flush()
    report = await replay(settings, rows(n, 50), ReplayOptions(deadline_s=DEADLINE_S, drain_s=5))
    await asyncio.sleep(1.0)  # the accountant's last acks
    await nc.drain()
    per_task = {kind: c / report.published for kind, c in counts.most_common()}
    return {"total": sum(per_task.values()), **per_task}


def message_kind(subject: str, prefix: str) -> str:
    """A subject with its per-call parts (inbox, ack, key, task id) folded away."""
    if subject.startswith(INBOX + "."):
        return f"{INBOX}.* (replies)"
    task_events = Subjects(prefix).task_events.removesuffix(".>")
    for folded in (JS_ACK, JS_EVENT, KV_API, OBJECT_STORE_API, task_events):
        if subject.startswith(folded + "."):
            return folded.replace(prefix, "<prefix>") + ".*"
    return re.sub(rf"^({re.escape(JS_API)}(?:\.[A-Z]+)+)\..*", r"\1", subject).replace(prefix, "<prefix>", 1)


def rows(count: int, rate: float) -> list[TraceRow]:
    return [TraceRow(arrival_s=i / rate, input_tokens=64, output_tokens=16) for i in range(count)]


async def run(settings: MeshSettings) -> dict:
    result: dict = {"nats_request_reply_ms": await nats_round_trip(settings)}
    log("raw NATS round trip measured; single-step tasks at 50/s...")
    gentle = await replay(settings, rows(400, 50), ReplayOptions(deadline_s=DEADLINE_S, drain_s=5))
    result["single_step_tasks"] = gentle.published
    result["mesh_overhead_ms"] = {k: getattr(gentle.mesh_overhead_ms, k) for k in ("p50", "p95", "p99")}
    result["e2e_latency_ms"] = {k: getattr(gentle.e2e_latency_ms, k) for k in ("p50", "p95", "p99")}
    result["backend_ms"] = {k: getattr(gentle.backend_ms, k) for k in ("p50", "p95", "p99")}
    result["zero_loss_at_50_per_s"] = gentle.zero_loss.ok
    sustained = 0
    result["throughput"] = {}
    for rate in RATES:
        log(f"open loop at {rate} tasks/s for {RATE_SECONDS:g}s...")
        cpu_before = cpu_seconds_by_process()
        report = await replay(
            settings, rows(int(rate * RATE_SECONDS), rate), ReplayOptions(deadline_s=DEADLINE_S, drain_s=5)
        )
        cpu_ms = {
            name: (seconds - cpu_before.get(name, 0.0)) * 1000 / max(report.published, 1)
            for name, seconds in cpu_seconds_by_process().items()
        }
        send_s = RATE_SECONDS
        ok = report.zero_loss.ok and report.outcomes["done"] == report.published
        kept_up = report.wall_s <= send_s * 1.1 + 1.0
        result["throughput"][f"{rate}_per_s"] = {
            "tasks": report.published,
            "done": report.outcomes["done"],
            "achieved_tasks_per_s": report.throughput_tasks_per_s,
            "wall_s": report.wall_s,
            "mesh_overhead_ms_p50": report.mesh_overhead_ms.p50,
            "mesh_overhead_ms_p99": report.mesh_overhead_ms.p99,
            "zero_loss": report.zero_loss.ok,
            "cpu_ms_per_task": dict(sorted(cpu_ms.items(), key=lambda item: -item[1])),
            "cpu_ms_per_task_total": sum(cpu_ms.values()),
        }
        if not (ok and kept_up):
            break  # a higher rate only queues more behind the same bottleneck
        sustained = rate
    result["highest_sustained_tasks_per_s"] = sustained
    log("messages per task at 50/s...")
    result["bus_messages_per_task"] = await bus_messages_per_task(settings)
    return result


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Mesh overhead per call vs the raw NATS round trip.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    args = parser.parse_args()
    with bench_stack(zero_latency_models()) as settings:
        result = asyncio.run(run(settings))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
