"""Kill-switch propagation: from the trip's write to the last service refusing paid calls.

``python -m loadtest.bench.killswitch --json`` starts its own nats-server (port picked free) and
the router, local-inference and cloud-inference as separate processes (``frugalmesh run``), each
on the shipped catalogue with the replay backends. A helper process answers reservations (it
grants every one: the accountant's budget rules are not what is measured here) and echoes the
raw request/reply probe.

Per trip, ``t0`` is taken just before ``set_kill`` writes the switch (the KV put every service
watches); at the same moment one probe per service starts sending paid calls back to back: a
step through the router (a local-tier draft), and a call straight to each inference service. A
service's refusal time is when its first reply saying ``killed`` arrives; propagation is the last
service's refusal minus ``t0``. It is an upper bound: it includes the KV write and up to one
probe round trip (a killed call is still metered, so that round trip includes a JetStream
publish). The switch is then cleared the same way, until every service admits calls again; the
mesh is idle between trips, so probing adds no background load. It is measured from the
``set_kill`` write, not from a settle crossing a cap: the accountant's trip on a cap is that
same write, made after it has decided.

The prompts are not recorded ones, so an admitted call ends at once as ``unavailable`` at $0
and is never cached: the probes load the services, not a model.
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
from collections.abc import Awaitable, Callable
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
)
from schemas.subjects import Subjects
from services.runtime.bus import ensure_streams, now_ms
from services.runtime.control import set_kill
from services.runtime.embedded import EmbeddedNats, stop_process

SERVICES = ("router", "local-inference", "cloud-inference")
LOCAL = "mixtral-8x7b-local"
FRONTIER = "gpt-4-1106-preview"
PROBE_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 60.0
# A trip that no service sees within this long is a failure, not a slow sample.
TRIP_TIMEOUT_S = 5.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# -- the helper process: reservations granted, settles acknowledged, raw echo --


def echo_subject(subjects: Subjects) -> str:
    return f"{subjects.prefix}.bench.echo"


def _helper_main(nats_url: str, prefix: str, ready: multiprocessing.synchronize.Event) -> None:
    async def serve() -> None:
        subjects = Subjects(prefix)
        nc = await nats.connect(nats_url)

        async def reserve(msg) -> None:
            reservation = msgspec.json.decode(msg.data, type=Reservation)
            await msg.respond(msgspec.json.encode(ReservationDecision(id=reservation.id, granted=True)))

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subjects.budget_reserve, cb=reserve)
        await nc.subscribe(subjects.budget_settle, cb=reserve)
        await nc.subscribe(echo_subject(subjects), cb=echo)
        await nc.flush()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(serve())


# -- the probes --


@dataclass
class Probe:
    """One service's probe: paid calls sent back to back until one gets the awaited reply."""

    name: str
    send: Callable[[], Awaitable[InferenceResult]]
    errors: int = 0
    round_trips_ms: list[float] = field(default_factory=list)

    async def until(self, killed: bool, timeout_s: float) -> float:
        """The time the first reply arrives whose error is (``killed``) or is not a kill."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                result = await self.send()
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

    async def step() -> InferenceResult:
        request = StepRequest(
            task_id="bench",
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

    def inference(model: str, tier: str, subject: str) -> Callable[[], Awaitable[InferenceResult]]:
        async def send() -> InferenceResult:
            request = InferenceRequest(
                call_id=uuid.uuid4().hex,
                task_id="bench",
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
    subject = echo_subject(subjects)
    payload = b"x" * 256
    times = []
    for _ in range(samples):
        sent = time.perf_counter()
        await nc.request(subject, payload, timeout=PROBE_TIMEOUT_S)
        times.append((time.perf_counter() - sent) * 1000)
    return times


async def measure(nats_url: str, subjects: Subjects, trips: int, rtt_samples: int) -> dict:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    loops = probes(nc, subjects)
    try:
        # Warm up: every service answers, and admits paid calls.
        await asyncio.gather(*(p.until(killed=False, timeout_s=30) for p in loops))
        rtt = await raw_round_trips(nc, subjects, rtt_samples)
        propagation: list[float] = []
        per_service: dict[str, list[float]] = {p.name: [] for p in loops}
        clears: list[float] = []
        for _ in range(trips):
            # The probes start with the write, so the mesh is idle between trips and busy during one.
            t0 = time.perf_counter()
            _, *refused = await asyncio.gather(
                set_kill(js, subjects, kill(True)), *(p.until(killed=True, timeout_s=TRIP_TIMEOUT_S) for p in loops)
            )
            for p, at in zip(loops, refused, strict=True):
                per_service[p.name].append((at - t0) * 1000)
            propagation.append((max(refused) - t0) * 1000)
            cleared = time.perf_counter()
            _, *admitted = await asyncio.gather(
                set_kill(js, subjects, kill(False)), *(p.until(killed=False, timeout_s=TRIP_TIMEOUT_S) for p in loops)
            )
            clears.append((max(admitted) - cleared) * 1000)
    finally:
        await nc.close()
    return {
        "kill_propagation_p50_ms": round(percentile(propagation, 50), 3),
        "kill_propagation_p99_ms": round(percentile(propagation, 99), 3),
        "kill_propagation_max_ms": round(max(propagation), 3),
        "trips": len(propagation),
        "measured_from": "the set_kill write (KV put of the switch), to the first 'killed' reply from the last service",
        "services": [
            {
                "service": p.name,
                "process": "separate (frugalmesh run)",
                "first_refusal_p50_ms": round(percentile(per_service[p.name], 50), 3),
                "first_refusal_p99_ms": round(percentile(per_service[p.name], 99), 3),
                "probe_rtt_p50_ms": round(percentile(p.round_trips_ms, 50), 3),
                "probe_errors": p.errors,
            }
            for p in loops
        ],
        "clear_propagation_p50_ms": round(percentile(clears, 50), 3),
        "clear_propagation_p99_ms": round(percentile(clears, 99), 3),
        "raw_nats_rtt_p50_ms": round(percentile(rtt, 50), 3),
        "raw_nats_rtt_p99_ms": round(percentile(rtt, 99), 3),
        "raw_nats_rtt_samples": len(rtt),
    }


def start_services(nats_url: str, prefix: str, run_dir: Path) -> dict[str, subprocess.Popen]:
    env = {**os.environ, "NATS_URL": nats_url, "FRUGALMESH_SUBJECT_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
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
                log = (run_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not start (exit code {process.poll()}):\n{log}")
            time.sleep(0.05)
    return processes


async def prepare(nats_url: str, subjects: Subjects) -> None:
    """Declare the streams and leave the switch cleared, as a fresh mesh would have it."""
    nc = await nats.connect(nats_url)
    await ensure_streams(nc.jetstream(), subjects)
    await set_kill(nc.jetstream(), subjects, kill(False))
    await nc.close()


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
                raise RuntimeError("the reservation/echo helper did not start")
            processes = start_services(server.url, prefix, run_dir)
            report = asyncio.run(measure(server.url, subjects, args.trips, args.rtt_samples))
        finally:
            for process in processes.values():
                stop_process(process)
            if helper is not None:
                helper.terminate()
                helper.join(5)
            server.stop()
    if args.json:
        print(json.dumps(report))
        return
    print(f"kill-switch propagation over {report['trips']} trips ({report['measured_from']}):")
    print(f"  p50 {report['kill_propagation_p50_ms']} ms, p99 {report['kill_propagation_p99_ms']} ms")
    for service in report["services"]:
        print(
            f"  {service['service']:<16} first refusal p50 {service['first_refusal_p50_ms']} ms, "
            f"p99 {service['first_refusal_p99_ms']} ms (probe round trip p50 {service['probe_rtt_p50_ms']} ms)"
        )
    print(f"raw NATS request/reply: p50 {report['raw_nats_rtt_p50_ms']} ms, p99 {report['raw_nats_rtt_p99_ms']} ms")


if __name__ == "__main__":
    main()
