"""Kill-switch propagation: from a settle crossing a cap to the last service refusing paid calls.

``python -m loadtest.bench.killswitch --json`` starts its own nats-server and ClickHouse (ports
picked free) and the accountant, router, local-inference and cloud-inference as separate
processes (``frugalmesh run``), each on the shipped catalogue and budgets with the replay
backends. A helper process echoes the raw request/reply probe.

Two measurements in the same run, 200 trips each (``--trips``):

- **from the cap crossing** (the headline figure): per trip a fresh task reserves $0.01 against
  its own $0.01 cap (``task_budget_usd``) and ``t0`` is taken just before it settles $0.01 with
  the accountant; that settle reaches the cap, so the accountant trips the task's switch (the KV
  write every service watches) and publishes the trip. At ``t0`` one probe per service starts
  sending paid calls of that task back to back: a step through the router (a local-tier draft),
  and a call straight to each inference service. A service's refusal time is when its first reply
  saying ``killed`` arrives; propagation is the last service's refusal minus ``t0``.
- **from the switch write**: the same probes, the global switch written with ``set_kill`` at
  ``t0`` (what ``frugalmesh kill`` does), then cleared the same way until every service admits
  calls again.

Each figure is an upper bound: it includes up to one probe round trip (a killed call is still
metered, so that round trip includes a JetStream publish), and for the cap crossing the settle's
own round trip. The mesh is idle between trips. The prompts are not recorded ones, so an admitted
call ends at once as ``unavailable`` at $0 and is never cached: the probes load the services,
not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import nats.errors

from schemas.messages import (
    ChatMessage,
    InferenceRequest,
    InferenceResult,
    KillSwitch,
    Reservation,
    ReservationDecision,
    StepRequest,
    Tier,
)
from schemas.subjects import Subjects
from services.embedded.servers import EmbeddedClickHouse, EmbeddedNats, stop_process
from services.runtime.bus import Bus, now_ms
from services.runtime.control import set_kill
from services.runtime.settings import MeshSettings
from services.runtime.streams import ensure_streams

SERVICES = ("accountant", "router", "local-inference", "cloud-inference")
LOCAL = "mixtral-8x7b-local"
FRONTIER = "gpt-4-1106-preview"
PROBE_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 60.0
# A trip that no service sees within this long is a failure, not a slow sample.
TRIP_TIMEOUT_S = 5.0
# Each cap-crossing trip's task spends exactly its cap.
TASK_CAP_USD = 0.01


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# -- the helper process: the raw echo --


def _helper_main(nats_url: str, prefix: str, ready: multiprocessing.synchronize.Event) -> None:
    async def serve() -> None:
        nc = await nats.connect(nats_url)

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(Subjects(prefix).bench_echo, cb=echo)
        await nc.flush()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(serve())


# -- the probes --


@dataclass
class Probe:
    """One service's probe: paid calls sent back to back until one gets the awaited reply."""

    name: str
    send: Callable[[str], Awaitable[InferenceResult]]
    errors: int = 0
    round_trips_ms: list[float] = field(default_factory=list)

    async def until(self, killed: bool, timeout_s: float, task_id: str = "bench") -> float:
        """The time the first reply to a call of ``task_id`` arrives whose error is (``killed``) or
        is not a kill."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                result = await self.send(task_id)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, msgspec.DecodeError):
                # A service still subscribing at start-up; counted, and the probe goes on.
                self.errors += 1
                await asyncio.sleep(0.01)
                continue
            received = time.perf_counter()
            self.round_trips_ms.append((received - sent) * 1000)
            if (result.error is not None and result.error.kind == "killed") == killed:
                return received
        raise TimeoutError(f"{self.name}: no {'killed' if killed else 'admitted'} reply within {timeout_s:.0f}s")


def probes(nc, subjects: Subjects) -> list[Probe]:
    counter = iter(range(10**12))

    def messages() -> list[ChatMessage]:
        return [ChatMessage(role="user", content=f"kill-switch probe {next(counter)}")]

    async def step(task_id: str) -> InferenceResult:
        request = StepRequest(
            task_id=task_id,
            step_id="probe",
            tenant="bench",
            workflow="answer",
            role="draft",
            messages=messages(),
            max_tokens=64,
            deadline_ms=now_ms() + int(PROBE_TIMEOUT_S * 1000),
        )
        reply = await nc.request(subjects.step_request, msgspec.json.encode(request), timeout=PROBE_TIMEOUT_S)
        return msgspec.json.decode(reply.data, type=InferenceResult)

    def inference(model: str, tier: Tier, subject: str) -> Callable[[str], Awaitable[InferenceResult]]:
        async def send(task_id: str) -> InferenceResult:
            request = InferenceRequest(
                call_id=uuid.uuid4().hex,
                task_id=task_id,
                step_id="probe",
                tenant="bench",
                model=model,
                tier=tier,
                messages=messages(),
                max_tokens=64,
                deadline_ms=now_ms() + int(PROBE_TIMEOUT_S * 1000),
            )
            reply = await nc.request(subject, msgspec.json.encode(request), timeout=PROBE_TIMEOUT_S)
            return msgspec.json.decode(reply.data, type=InferenceResult)

        return send

    return [
        Probe("router", step),
        Probe("local-inference", inference(LOCAL, "local", subjects.infer_local(LOCAL))),
        Probe("cloud-inference", inference(FRONTIER, "frontier", subjects.infer_cloud("openai"))),
    ]


def kill(tripped: bool) -> KillSwitch:
    return KillSwitch(scope="global", tripped=tripped, reason="killswitch benchmark", by="bench", time_ms=now_ms())


async def raw_round_trips(nc, subjects: Subjects, samples: int) -> list[float]:
    subject = subjects.bench_echo
    payload = b"x" * 256
    times = []
    for _ in range(samples):
        sent = time.perf_counter()
        await nc.request(subject, payload, timeout=PROBE_TIMEOUT_S)
        times.append((time.perf_counter() - sent) * 1000)
    return times


async def cross_cap(nc, subjects: Subjects, task_id: str) -> Reservation:
    """Reserve a task's whole cap, then settle it: the settle reaches the cap and trips the switch."""
    hold = Reservation(
        id=uuid.uuid4().hex,
        tenant="bench",
        task_id=task_id,
        model=LOCAL,
        amount_usd=TASK_CAP_USD,
        expires_ms=now_ms() + 60_000,
        task_budget_usd=TASK_CAP_USD,
    )
    reply = await nc.request(subjects.budget_reserve, msgspec.json.encode(hold), timeout=PROBE_TIMEOUT_S)
    decision = msgspec.json.decode(reply.data, type=ReservationDecision)
    if not decision.granted:
        raise RuntimeError(f"the accountant refused the trip's reservation: {decision.reason}")
    return hold


def summary(name: str, totals: list[float], per_service: dict[str, list[float]], loops: list[Probe]) -> dict:
    return {
        f"{name}_p50_ms": round(percentile(totals, 50), 3),
        f"{name}_p99_ms": round(percentile(totals, 99), 3),
        f"{name}_max_ms": round(max(totals), 3),
        f"{name}_per_service": [
            {
                "service": p.name,
                "first_refusal_p50_ms": round(percentile(per_service[p.name], 50), 3),
                "first_refusal_p99_ms": round(percentile(per_service[p.name], 99), 3),
            }
            for p in loops
        ],
    }


async def with_probes(first: Awaitable[object], probes: Iterable[Awaitable[float]]) -> list[float]:
    """Run ``first`` and the probes together (``first`` scheduled first); the probes' reply times."""
    started = asyncio.ensure_future(first)
    _, times = await asyncio.gather(started, asyncio.gather(*probes))
    return times


async def measure(nats_url: str, subjects: Subjects, trips: int, rtt_samples: int) -> dict:
    nc = await nats.connect(nats_url)
    # The switch is written as `frugalmesh kill` writes it: through a Bus.
    operator = Bus(MeshSettings(nats_url=nats_url, subject_prefix=subjects.prefix), "bench")
    await operator.connect()
    loops = probes(nc, subjects)
    run = uuid.uuid4().hex[:6]
    try:
        # Warm up: every service answers, and admits paid calls.
        await asyncio.gather(*(p.until(killed=False, timeout_s=30) for p in loops))
        rtt = await raw_round_trips(nc, subjects, rtt_samples)

        crossing: list[float] = []
        crossing_per_service: dict[str, list[float]] = {p.name: [] for p in loops}
        for i in range(trips):
            task_id = f"trip-{run}-{i}"
            hold = await cross_cap(nc, subjects, task_id)
            settle = msgspec.json.encode(msgspec.structs.replace(hold, actual_usd=TASK_CAP_USD))
            # The probes start with the settle that crosses the cap.
            t0 = time.perf_counter()
            refused = await with_probes(
                nc.request(subjects.budget_settle, settle, timeout=PROBE_TIMEOUT_S),
                (p.until(killed=True, timeout_s=TRIP_TIMEOUT_S, task_id=task_id) for p in loops),
            )
            for p, at in zip(loops, refused, strict=True):
                crossing_per_service[p.name].append((at - t0) * 1000)
            crossing.append((max(refused) - t0) * 1000)

        writes: list[float] = []
        write_per_service: dict[str, list[float]] = {p.name: [] for p in loops}
        clears: list[float] = []
        for _ in range(trips):
            t0 = time.perf_counter()
            refused = await with_probes(
                set_kill(operator, kill(True)), (p.until(killed=True, timeout_s=TRIP_TIMEOUT_S) for p in loops)
            )
            for p, at in zip(loops, refused, strict=True):
                write_per_service[p.name].append((at - t0) * 1000)
            writes.append((max(refused) - t0) * 1000)
            cleared = time.perf_counter()
            admitted = await with_probes(
                set_kill(operator, kill(False)), (p.until(killed=False, timeout_s=TRIP_TIMEOUT_S) for p in loops)
            )
            clears.append((max(admitted) - cleared) * 1000)
    finally:
        await operator.close()
        await nc.close()
    return {
        **summary("kill_propagation", crossing, crossing_per_service, loops),
        "trips": len(crossing),
        "measured_from": "a settle that reaches a task's cap (sent to the accountant), to the first 'killed' reply "
        "from the last of router, local-inference and cloud-inference (separate processes)",
        **summary("switch_write_propagation", writes, write_per_service, loops),
        "clear_propagation_p50_ms": round(percentile(clears, 50), 3),
        "clear_propagation_p99_ms": round(percentile(clears, 99), 3),
        "probe_rtt_p50_ms": {p.name: round(percentile(p.round_trips_ms, 50), 3) for p in loops},
        "probe_errors": {p.name: p.errors for p in loops},
        "raw_nats_rtt_p50_ms": round(percentile(rtt, 50), 3),
        "raw_nats_rtt_p99_ms": round(percentile(rtt, 99), 3),
        "raw_nats_rtt_samples": len(rtt),
    }


def start_services(nats_url: str, clickhouse_url: str, prefix: str, run_dir: Path) -> dict[str, subprocess.Popen]:
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "CLICKHOUSE_URL": clickhouse_url,
        "FRUGALMESH_SUBJECT_PREFIX": prefix,
        "PYTHONUNBUFFERED": "1",
    }
    processes = {}
    for name in SERVICES:
        ready = run_dir / f"{name}.ready"
        with (run_dir / f"{name}.log").open("ab") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "run", name, "--ready-file", str(ready)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    deadline = time.monotonic() + READY_TIMEOUT_S
    for name, process in processes.items():
        while not (run_dir / f"{name}.ready").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (run_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not start (exit code {process.poll()}):\n{tail}")
            time.sleep(0.05)
    return processes


async def prepare(nats_url: str, subjects: Subjects) -> None:
    """Declare the streams and leave the switch cleared, as a fresh mesh would have it."""
    bus = Bus(MeshSettings(nats_url=nats_url, subject_prefix=subjects.prefix), "bench")
    await bus.connect()
    await ensure_streams(bus.jetstream, subjects)
    await set_kill(bus, kill(False))
    await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--trips", type=int, default=200)
    parser.add_argument("--rtt-samples", type=int, default=1000)
    args = parser.parse_args()
    prefix = "bench" + uuid.uuid4().hex[:8]
    subjects = Subjects(prefix)
    with tempfile.TemporaryDirectory(prefix="killswitch-") as tmp:
        run_dir = Path(tmp)
        server = EmbeddedNats(run_dir / "nats", port=-1)
        server.start()
        clickhouse = EmbeddedClickHouse(run_dir / "clickhouse", port=0)
        helper = None
        processes: dict[str, subprocess.Popen] = {}
        try:
            asyncio.run(prepare(server.url, subjects))
            ready = multiprocessing.get_context("spawn").Event()
            helper = multiprocessing.get_context("spawn").Process(
                target=_helper_main, args=(server.url, prefix, ready), daemon=True
            )
            helper.start()
            if not ready.wait(30):
                raise RuntimeError("the echo helper did not start")
            processes = start_services(server.url, clickhouse.start(), prefix, run_dir)
            report = asyncio.run(measure(server.url, subjects, args.trips, args.rtt_samples))
        finally:
            for process in processes.values():
                stop_process(process)
            if helper is not None:
                helper.terminate()
                helper.join(5)
            clickhouse.stop()
            server.stop()
    if args.json:
        print(json.dumps(report))
        return
    print(f"kill-switch propagation over {report['trips']} trips ({report['measured_from']}):")
    for name in ("kill_propagation", "switch_write_propagation"):
        print(f"  {name}: p50 {report[name + '_p50_ms']} ms, p99 {report[name + '_p99_ms']} ms")
        for service in report[name + "_per_service"]:
            print(
                f"    {service['service']:<16} first refusal p50 {service['first_refusal_p50_ms']} ms, "
                f"p99 {service['first_refusal_p99_ms']} ms"
            )
    print(f"raw NATS request/reply: p50 {report['raw_nats_rtt_p50_ms']} ms, p99 {report['raw_nats_rtt_p99_ms']} ms")


if __name__ == "__main__":
    main()
