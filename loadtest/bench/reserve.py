"""Reservation round trip under 500 concurrent callers, next to the raw NATS request/reply round trip.

``python -m loadtest.bench.reserve [--json]`` starts its own nats-server and embedded ClickHouse,
the accountant as a separate process (as in production), and a trivial nats-py echo responder
as another process. Each of ``--callers`` concurrent callers then loops ``--rounds`` times over
two requests, against the echo responder (raw) and against the accountant (a reserve, then the
settle of that reservation, as the router does), in alternating halves. Both phases send the same bytes (a
Reservation), with the same concurrency and the same two requests per round, so the ratio
isolates what the accountant adds: decoding, the cap checks, and the group-committed journal
write a granted reservation waits for before its reply.

``--nats`` picks where the journal is stored, to measure what durability costs: ``single`` (one
nats-server, JetStream's default fsync every two minutes), ``single-fsync`` (one server fsyncing
every write: ``sync_interval: always``) or ``cluster`` (the three-node cluster of `frugalmesh up
--cluster 3`: three copies of every stream, each node fsyncing every write).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats

from schemas.messages import Reservation, ReservationDecision
from schemas.subjects import Subjects
from services.embedded.cluster import EmbeddedNatsCluster
from services.embedded.servers import EmbeddedClickHouse, EmbeddedNats, stop_process
from services.runtime.bus import encode, now_ms

REPO = Path(__file__).resolve().parents[2]
WARMUP_ROUNDS = 2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def echo_responder(url: str, subject: str) -> None:
    """The raw baseline: reply with the request's own bytes."""
    nc = await nats.connect(url.split(","))

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


def start_process(args: list[str], env: dict[str, str], ready: Path | None, log: Path) -> subprocess.Popen:
    out = log.open("wb")
    stdout = out if ready else subprocess.PIPE
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=stdout, stderr=out)
    deadline = time.monotonic() + 60
    if ready is None:  # the echo responder prints "ready"
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"echo responder failed; see {log}")
        return process
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{args} did not start; see {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return process


async def measure(url: str, callers: int, rounds: int, raw_subject: str, prefix: str) -> dict[str, list[float]]:
    nc = await nats.connect(url.split(","))
    reserve_subject, settle_subject = Subjects(prefix).budget_reserve, Subjects(prefix).budget_settle
    out: dict[str, list[float]] = {"raw": [], "reserve": [], "settle": []}
    refused: list[str] = []

    def reservation(caller: int, i: int) -> Reservation:
        return Reservation(
            id=f"c{caller}-{i}-{uuid.uuid4().hex[:8]}",
            tenant=f"tenant-{caller % 20}",
            task_id=f"task-{caller}",
            model="mixtral-8x7b",
            amount_usd=0.0002,
            expires_ms=now_ms() + 60_000,
            task_budget_usd=1.0,
        )

    async def timed(subject: str, data: bytes) -> tuple[float, bytes]:
        start = time.perf_counter()
        reply = await nc.request(subject, data, timeout=30)
        return (time.perf_counter() - start) * 1000, reply.data

    async def raw_caller(caller: int, rounds: int) -> None:
        for i in range(WARMUP_ROUNDS + rounds):
            data = encode(reservation(caller, i))
            first, _ = await timed(raw_subject, data)
            second, _ = await timed(raw_subject, data)
            if i >= WARMUP_ROUNDS:
                out["raw"] += [first, second]

    async def mesh_caller(caller: int, rounds: int) -> None:
        for i in range(WARMUP_ROUNDS + rounds):
            r = reservation(caller, i)
            reserve_ms, reply = await timed(reserve_subject, encode(r))
            decision = msgspec.json.decode(reply, type=ReservationDecision)
            if not decision.granted:
                refused.append(decision.reason)
            settle_ms, _ = await timed(settle_subject, encode(msgspec.structs.replace(r, actual_usd=0.0001)))
            if i >= WARMUP_ROUNDS:
                out["reserve"].append(reserve_ms)
                out["settle"].append(settle_ms)

    # The callers' own process pauses for full garbage collections too: over its start-up objects
    # one took 60-70 ms on these CPUs, and the reserve phase, which allocates more, was where it
    # usually fell, so it was counted as reservation time. Frozen, they are left out of
    # collections (as the accountant does with its own).
    gc.collect()
    gc.freeze()
    # Two alternating halves, so a change in the machine's other load hits both phases alike.
    for half in (rounds // 2, rounds - rounds // 2):
        await asyncio.gather(*(raw_caller(c, half) for c in range(callers)))
        await asyncio.gather(*(mesh_caller(c, half) for c in range(callers)))
    await nc.close()
    if refused:
        raise RuntimeError(f"{len(refused)} reservations refused, e.g. {refused[0]}")
    return out


NATS_SETUPS = ("single", "single-fsync", "cluster")


def run(callers: int, rounds: int, nats_setup: str = "single") -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory(prefix="bench-reserve-") as tmp_dir:
        tmp = Path(tmp_dir)
        nats_server: EmbeddedNats | EmbeddedNatsCluster
        if nats_setup == "cluster":
            nats_server = EmbeddedNatsCluster(tmp / "nats", sync_interval="always")
        else:
            fsync = "jetstream { sync_interval: always }\n" if nats_setup == "single-fsync" else ""
            nats_server = EmbeddedNats(tmp / "nats", port=-1, config=fsync)
        clickhouse = EmbeddedClickHouse(tmp / "clickhouse", port=0)
        processes: list[subprocess.Popen] = []
        try:
            url = nats_server.start()
            ch_url = clickhouse.start()
            prefix = "bench" + uuid.uuid4().hex[:6]
            raw_subject = Subjects(prefix).bench_echo
            env = {
                **os.environ,
                "NATS_URL": url,
                "CLICKHOUSE_URL": ch_url,
                "FRUGALMESH_SUBJECT_PREFIX": prefix,
                "FRUGALMESH_REPLICAS": "3" if nats_setup == "cluster" else "1",
                "FRUGALMESH_LOG_LEVEL": "WARNING",
            }
            accountant = ["-m", "services.cli.main", "run", "accountant", "--ready-file", str(tmp / "ready")]
            processes.append(start_process(accountant, env, tmp / "ready", tmp / "accountant.log"))
            processes.append(
                start_process(
                    ["-m", "loadtest.bench.reserve", "--echo-responder", url, raw_subject], env, None, tmp / "echo.log"
                )
            )
            times = asyncio.run(measure(url, callers, rounds, raw_subject, prefix))
        finally:
            for process in processes:
                stop_process(process)
            clickhouse.stop()
            nats_server.stop()
    figures: dict[str, float | int] = {
        "reserve_rtt_p50_ms": statistics.median(times["reserve"]),
        "reserve_rtt_p99_ms": percentile(times["reserve"], 99),
        "settle_rtt_p50_ms": statistics.median(times["settle"]),
        "settle_rtt_p99_ms": percentile(times["settle"], 99),
        "raw_nats_rtt_p50_ms": statistics.median(times["raw"]),
        "raw_nats_rtt_p99_ms": percentile(times["raw"], 99),
    }
    figures["reserve_to_raw_p50_ratio"] = figures["reserve_rtt_p50_ms"] / figures["raw_nats_rtt_p50_ms"]
    figures["reserve_to_raw_p99_ratio"] = figures["reserve_rtt_p99_ms"] / figures["raw_nats_rtt_p99_ms"]
    rounded: dict[str, float | int | str] = {k: round(v, 3) for k, v in figures.items()}
    rounded["callers"] = callers
    rounded["requests"] = len(times["reserve"])
    rounded["nats"] = nats_setup
    return rounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--callers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20, help="Measured reserve+settle rounds per caller.")
    parser.add_argument("--nats", choices=NATS_SETUPS, default="single", help="Where the journal is stored.")
    parser.add_argument("--echo-responder", nargs=2, metavar=("URL", "SUBJECT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_responder:
        asyncio.run(echo_responder(*args.echo_responder))
        return
    figures = run(args.callers, args.rounds, args.nats)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{figures['callers']} concurrent callers, {figures['requests']} reservations (each followed by its settle)")
    print(f"  journal on: {figures['nats']}")
    print(f"  reserve   p50 {figures['reserve_rtt_p50_ms']:8.3f} ms   p99 {figures['reserve_rtt_p99_ms']:8.3f} ms")
    print(f"  settle    p50 {figures['settle_rtt_p50_ms']:8.3f} ms   p99 {figures['settle_rtt_p99_ms']:8.3f} ms")
    print(f"  raw NATS  p50 {figures['raw_nats_rtt_p50_ms']:8.3f} ms   p99 {figures['raw_nats_rtt_p99_ms']:8.3f} ms")
    p50, p99 = figures["reserve_to_raw_p50_ratio"], figures["reserve_to_raw_p99_ratio"]
    print(f"  reserve / raw: p50 x{p50:.2f}, p99 x{p99:.2f} (target: within 2x)")


if __name__ == "__main__":
    main()
