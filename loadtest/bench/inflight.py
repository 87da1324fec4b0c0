"""Calls in flight per replica with slow models: does the mesh hold them, or queue them?

``python -m loadtest.bench.inflight --json``. A private stack (one replica of each service) runs the
load-test deploy with every model answering after a fixed ``--call-s`` seconds (the latency model:
``ttft_ms``, nothing else), and single-step tasks arrive open loop at rising rates. By Little's law
a mesh that does not queue holds ``rate x call time`` calls in flight; one that queues holds fewer
and its overhead grows. Per step:

- ``calls_in_flight_peak`` / ``_mean``: tasks sent and not yet ended, sampled every 100 ms;
- ``overhead_ms_p50`` / ``_p99``: end to end minus the modelled time the usage rows metered;
- ``cpu_ms_per_call``: CPU of every process of the stack (and the load generator) per task;
- ``rss_kb_per_call_in_flight``: resident memory each process gained at the peak over its idle
  size, per call then in flight;
- ``kept_up``: every task ended done, nothing lost, and the run ended within 10% (plus one call
  time) of its send time.

The steps stop at the first rate that does not keep up. A last phase, ``capacity``, holds
``--capacity-calls`` in flight at a rate the CPU sustains, by making the calls long
(``--capacity-call-s``): what bounds calls in flight, apart from CPU, is memory per call.
The raw NATS request/reply round trip is measured in the same run as the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import dataclass, field

from loadtest.bench.common import bench_stack, cpu_seconds_by_process, rss_kb_by_process
from loadtest.bench.overhead import nats_round_trip, rows
from loadtest.deploy import LOADTEST_MODELS
from loadtest.replay import Live, ReplayOptions, replay
from services.runtime.settings import MeshSettings

RATES = (50, 100, 200, 400, 800)
STEP_S = 10.0
CAPACITY_CALLS = 5_000


def fixed_latency_models(call_s: float) -> str:
    """deploy/loadtest/models.toml with every model answering after ``call_s`` seconds exactly."""
    keys = "prefill_tokens_per_s|output_tokens_per_s|prompt_cache_block_tokens"
    text = re.sub(rf"(?m)^({keys}) = .*\n", "", LOADTEST_MODELS.read_text())
    return re.sub(r"(?m)^ttft_ms = .*$", f"ttft_ms = {call_s * 1000:g}", text)


@dataclass
class InFlight:
    """Samples of calls in flight during one step, and each process's memory at the peak."""

    samples: list[int] = field(default_factory=list)
    rss_at_peak: dict[str, float] = field(default_factory=dict)

    def tick(self, live: Live) -> None:
        in_flight = live.in_flight
        if not self.samples or in_flight > max(self.samples):
            self.rss_at_peak = rss_kb_by_process()
        self.samples.append(in_flight)


async def step(settings: MeshSettings, rate: float, seconds: float, call_s: float) -> dict:
    idle_rss = rss_kb_by_process()
    cpu_before = cpu_seconds_by_process()
    watch = InFlight()
    options = ReplayOptions(deadline_s=call_s * 4 + 30, drain_s=call_s * 2 + 10)
    report = await replay(settings, rows(int(rate * seconds), rate), options, on_tick=watch.tick)
    tasks = max(report.published, 1)
    cpu_ms = {name: (s - cpu_before.get(name, 0.0)) * 1000 / tasks for name, s in cpu_seconds_by_process().items()}
    peak = max(watch.samples, default=0)
    rss_per_call = {
        name: (kb - idle_rss.get(name, kb)) / peak for name, kb in watch.rss_at_peak.items() if peak
    }
    kept_up = (
        report.zero_loss.ok and report.outcomes.get("done", 0) == report.published
        and report.wall_s <= seconds * 1.1 + call_s + 1.0
    )  # fmt: skip
    return {
        "offered_tasks_per_s": rate,
        "tasks": report.published,
        "done": report.outcomes.get("done", 0),
        "calls_in_flight_expected": rate * call_s,
        "calls_in_flight_peak": peak,
        "calls_in_flight_mean": sum(watch.samples) / max(len(watch.samples), 1),
        "overhead_ms_p50": report.mesh_overhead_ms.p50,
        "overhead_ms_p99": report.mesh_overhead_ms.p99,
        "backend_ms_p50": report.backend_ms.p50,
        "cpu_ms_per_call": dict(sorted(cpu_ms.items(), key=lambda item: -item[1])),
        "cpu_ms_per_call_total": sum(cpu_ms.values()),
        "rss_kb_per_call_in_flight": dict(sorted(rss_per_call.items(), key=lambda item: -item[1])),
        "rss_kb_per_call_in_flight_total": sum(rss_per_call.values()),
        "zero_loss": report.zero_loss.ok,
        "kept_up": kept_up,
    }


async def stepped(settings: MeshSettings, call_s: float, rates: list[float]) -> dict:
    result: dict = {"nats_request_reply_ms": await nats_round_trip(settings, n=500), "steps": []}
    for rate in rates:
        log(f"{rate:g} tasks/s of {call_s:g} s calls for {STEP_S:g} s...")
        outcome = await step(settings, rate, STEP_S, call_s)
        log(json.dumps(outcome))
        result["steps"].append(outcome)
        if not outcome["kept_up"]:
            break
    kept = [s for s in result["steps"] if s["kept_up"]]
    result["highest_kept_up_tasks_per_s"] = max((s["offered_tasks_per_s"] for s in kept), default=0)
    result["most_calls_in_flight_kept_up"] = max((s["calls_in_flight_peak"] for s in kept), default=0)
    return result


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Calls in flight per replica with slow models.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    parser.add_argument("--call-s", type=float, default=5.0, help="Seconds every model call takes (default 5).")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="Offered tasks/s, stepped up in order.")
    parser.add_argument("--capacity-calls", type=int, default=CAPACITY_CALLS, help="Calls to hold in flight at once.")
    parser.add_argument("--capacity-call-s", type=float, default=40.0, help="Their length, s (sets the rate).")
    args = parser.parse_args()
    result: dict = {"call_s": args.call_s}
    with bench_stack(fixed_latency_models(args.call_s)) as settings:
        result |= asyncio.run(stepped(settings, args.call_s, [float(r) for r in args.rates.split(",")]))
    if args.capacity_calls:
        rate = args.capacity_calls / args.capacity_call_s
        log(f"capacity: {args.capacity_calls} calls of {args.capacity_call_s:g} s in flight ({rate:g} tasks/s)...")
        with bench_stack(fixed_latency_models(args.capacity_call_s)) as settings:
            outcome = asyncio.run(step(settings, rate, args.capacity_call_s, args.capacity_call_s))
        result["capacity"] = {"call_s": args.capacity_call_s, **outcome}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
