"""Node loss under load on a real three-node JetStream cluster (`frugalmesh up --cluster 3`'s Stack, every
stream and bucket in three copies): a nats-server SIGKILLed during a recorded-trace replay and started
again, and the leading accountant SIGKILLed among 1,000 concurrent calls against a cap. Every task
and call ends, nothing is lost, every call has exactly one usage row, and reserved plus settled
never passes the cap. Each test prints what the failure cost (``CHAOS {...}``: docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import pytest
from clickhouse_connect.driver.client import Client

from loadtest.deploy import LOADTEST_MODELS, loadtest_deploy_dir
from loadtest.replay import Live, ReplayOptions, replay
from loadtest.traces import read_trace, resolve_trace
from schemas.messages import BudgetQuery, BudgetState, BudgetUpdate, Reservation, UsageEvent
from schemas.subjects import BUCKET_ACCOUNTANT_LEASE, LEASE_KEY, OPERATOR_BUDGET, STREAM_TASKS
from services.embedded.stack import Stack
from services.runtime.bus import Bus, now_ms
from services.runtime.reservations import ReservationClient
from services.runtime.settings import MeshSettings

pytestmark = [pytest.mark.infra, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CALLS = 1_000
CAP_USD = 6.0
WORST_CASE_USD = 0.01
ACTUAL_USD = 0.008
# Calls arrive one every ARRIVAL_S (open loop: 1,000 over about three seconds) and each runs CALL_S
# between its reserve and its settle, as a model call would: hundreds are in flight at once.
ARRIVAL_S = 0.003
CALL_S = 1.0
KILL_AFTER_RESERVES = 300
# Bounds on a loaded two-core machine: far above what a healthy run takes, far below a hang.
ENDED_WITHIN_S = 120.0
INGESTED_WITHIN_S = 60.0


@pytest.fixture(scope="module")
def cluster_mesh(infra, data_dir, tmp_path_factory):
    """The mesh's services on a three-node cluster the Stack starts, with the load-test deploy
    (synthetic backends, latencies shrunk to milliseconds) and the session's ClickHouse."""
    home = tmp_path_factory.mktemp("home")
    deploy = loadtest_deploy_dir(tmp_path_factory.mktemp("deploy") / "deploy")
    models = re.sub(
        r"(?m)^(output|prefill)_tokens_per_s = .*$", r"\1_tokens_per_s = 100000", LOADTEST_MODELS.read_text()
    )
    (deploy / "models.toml").write_text(re.sub(r"(?m)^ttft_ms = .*$", "ttft_ms = 2", models))
    prefix = "ch" + uuid.uuid4().hex[:8]
    settings = MeshSettings(clickhouse_url=infra[1], subject_prefix=prefix, data=data_dir, deploy_dir=deploy, home=home)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("NATS_URL", raising=False)  # the Stack starts the cluster, with the mesh's identities
        env.delenv("FRUGALMESH_NATS_CREDS", raising=False)
        env.setenv("CLICKHOUSE_URL", infra[1])
        env.setenv("FRUGALMESH_DEPLOY_DIR", str(deploy))
        env.setenv("FRUGALMESH_HOME", str(home))
        env.setenv("FRUGALMESH_SUBJECT_PREFIX", prefix)
        stack = Stack(home=home, settings=settings, nats_port=-1, local_engine=None, agents={}, nats_cluster=3)
        with stack:
            yield stack


def chaos_report(name: str, **figures: float | int | str) -> None:
    print("CHAOS " + json.dumps({"test": name, **figures}), flush=True)


async def test_a_nats_server_killed_during_a_replay_loses_no_task_and_no_row(cluster_mesh, data_dir):
    stack: Stack = cluster_mesh
    assert stack.cluster is not None and stack.settings.replicas == 3
    rows = read_trace(resolve_trace("azure-code", data_dir), limit=60)
    span = rows[-1].arrival_s - rows[0].arrival_s
    options = ReplayOptions(speed=max(1.0, span / 6.0), deadline_s=60, drain_s=30, salt=uuid.uuid4().hex)
    progress = {threshold: asyncio.Event() for threshold in (10, 30)}

    def on_tick(live: Live) -> None:
        for threshold, reached in progress.items():
            if live.finished >= threshold:
                reached.set()

    replaying = asyncio.create_task(replay(stack.settings, rows, options, on_tick))

    async def until(threshold: int) -> None:
        reached = asyncio.create_task(progress[threshold].wait())
        await asyncio.wait({reached, replaying}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        if replaying.done():
            replaying.result()  # what ended the replay early
        assert progress[threshold].is_set(), f"fewer than {threshold} tasks ended within 60 s"

    await until(10)
    # The node leading the task stream: the one whose loss hurts most.
    bus = Bus(stack.settings, "test")
    await bus.connect()
    try:
        info = await bus.jetstream.stream_info(stack.settings.subjects.stream(STREAM_TASKS))
    finally:
        await bus.close()
    victim = next(i for i, node in enumerate(stack.cluster.nodes) if info.cluster and node.name == info.cluster.leader)
    killed = time.monotonic()
    stack.cluster.kill(victim)
    # The mesh goes on with two of three nodes before the third comes back.
    await until(30)
    progressed_s = time.monotonic() - killed
    stack.cluster.restart(victim)
    report = await asyncio.wait_for(replaying, ENDED_WITHIN_S)
    chaos_report(
        "nats_server_killed",
        tasks=report.published,
        outcomes=json.dumps(report.outcomes),
        not_done=json.dumps(report.not_done_reasons),
        twenty_tasks_ended_on_two_nodes_s=round(progressed_s, 2),
        e2e_p99_ms=report.e2e_latency_ms.p99,
    )
    assert report.published == len(rows)
    assert report.zero_loss.ok, report.zero_loss
    assert report.zero_loss.missing == 0 and report.zero_loss.ended == len(rows)
    assert stack.dead_services() == []


@dataclass
class Call:
    started: float
    reserved: float = 0.0  # when the reserve was answered
    ended: float = 0.0
    granted: bool = False
    reason: str = ""


def start_standby(stack: Stack, log: Path) -> subprocess.Popen:
    ready = log.with_suffix(".ready")
    env = {
        **os.environ,
        "NATS_URL": stack.settings.nats_url,
        "FRUGALMESH_REPLICAS": str(stack.settings.replicas),
        "CLICKHOUSE_URL": stack.settings.clickhouse_url,
        # A second accountant: the one identity that may write the ledger and the budgets.
        "FRUGALMESH_NATS_CREDS": str(stack.creds["accountant"]),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "run", "accountant", "--ready-file", str(ready)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the standby accountant did not start"
        time.sleep(0.05)
    return process


async def show_budget(bus: Bus, tenant: str) -> BudgetState:
    """The leader's view of ``tenant``'s budget, asked again while no replica serves (a takeover)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            query = BudgetQuery(scope="tenant", key=tenant)
            return await bus.request(bus.subjects.budget_show, query, BudgetState, 10)
        except nats.errors.NoRespondersError:
            assert time.monotonic() < deadline, "no accountant served budgets again"
            await asyncio.sleep(0.1)


def usage_rows(ch: Client, tenant: str) -> tuple[int, int]:
    return ch.query(
        "SELECT count(), uniqExact(event_id) FROM usage_events WHERE tenant = {t:String}", parameters={"t": tenant}
    ).result_rows[0]


async def test_the_leading_accountant_killed_among_a_thousand_calls_overspends_nothing(cluster_mesh, ch, tmp_path):
    stack: Stack = cluster_mesh
    settings = stack.settings
    tenant = "chaos" + uuid.uuid4().hex[:6]
    standby = start_standby(stack, tmp_path / "standby.log")
    # The calls are the router's to reserve and meter: this test plays it, on its credential.
    bus = Bus(settings.model_copy(update={"nats_creds": stack.creds["router"]}), "test")
    operator = Bus(settings, "operator")
    await bus.connect()
    await operator.connect()
    try:
        cap = await operator.request(
            settings.subjects.operator(settings.operator, OPERATOR_BUDGET),
            BudgetUpdate(scope="tenant", key=tenant, day_usd=CAP_USD),
            BudgetState,
            10,
        )
        assert cap.error is None
        lease = await bus.key_value(settings.subjects.bucket(BUCKET_ACCOUNTANT_LEASE))
        leader_pid = int((await lease.get(LEASE_KEY)).value.decode().rsplit("-", 2)[1])
        assert leader_pid in (standby.pid, stack.services["accountant"].pid)
        client = ReservationClient(bus)
        calls: dict[int, Call] = {}
        reserves_answered = 0
        enough_answered = asyncio.Event()

        async def call(i: int) -> None:
            nonlocal reserves_answered
            r = Reservation(
                id=f"{tenant}-{i:04d}", tenant=tenant, task_id=f"task-{i % 50}", model="mixtral-8x7b",
                amount_usd=WORST_CASE_USD, expires_ms=now_ms() + 300_000,
            )  # fmt: skip
            entry = calls[i] = Call(time.monotonic())
            decision = await client.reserve(r, time_left_s=30)
            entry.reserved = time.monotonic()
            entry.granted, entry.reason = decision.granted, decision.reason
            reserves_answered += 1
            if reserves_answered >= KILL_AFTER_RESERVES:
                enough_answered.set()
            cost = ACTUAL_USD if decision.granted else 0.0
            if decision.granted:
                await asyncio.sleep(CALL_S)  # the model call itself
                await client.settle(r, ACTUAL_USD)
            # Exactly one usage row per call, as the router meters a call granted or refused.
            await bus.publish_usage(
                UsageEvent(
                    event_id=r.id,
                    time_ms=now_ms(),
                    tenant=tenant,
                    task_id=r.task_id,
                    call_id=r.id,
                    service="cloud-inference",
                    tier="mid",
                    provider="together",
                    model=r.model,
                    requested_model=r.model,
                    cost_usd=cost,
                    outcome="ok" if decision.granted else "refused",
                )  # fmt: skip
            )
            entry.ended = time.monotonic()

        async def arrive() -> None:
            started = []
            for i in range(CALLS):
                started.append(asyncio.create_task(call(i)))
                await asyncio.sleep(ARRIVAL_S)
            await asyncio.gather(*started)

        running = asyncio.create_task(arrive())
        await asyncio.wait_for(enough_answered.wait(), ENDED_WITHIN_S)
        killed = time.monotonic()
        os.kill(leader_pid, signal.SIGKILL)
        await asyncio.wait_for(running, ENDED_WITHIN_S)

        # Every call ended; what the failover cost the calls in flight when the leader died.
        assert len(calls) == CALLS and all(c.ended for c in calls.values())
        granted = [c for c in calls.values() if c.granted]
        spanning = [c for c in calls.values() if c.started <= killed <= c.reserved]
        granted_after = [c.reserved for c in granted if c.reserved > killed]
        refused_unavailable = sum(1 for c in calls.values() if c.reason.startswith("budget service unavailable"))
        chaos_report(
            "leading_accountant_killed",
            calls=CALLS,
            granted=len(granted),
            refused_unavailable=refused_unavailable,
            reserves_pending_at_kill=len(spanning),
            first_grant_after_kill_s=round(min(granted_after, default=float("nan")) - killed, 2),
        )
        # Never over the cap: what was granted, and what the new leader holds.
        assert len(granted) * ACTUAL_USD <= CAP_USD + 1e-9
        state = await show_budget(bus, tenant)
        day = next(s for s in state.spend if (s.scope, s.key, s.window) == ("tenant", tenant, "day"))
        assert day.settled_usd + day.reserved_usd <= CAP_USD + 1e-9
        # Nothing under-counted: every granted call is settled, or still held at its worst case.
        assert day.settled_usd + day.reserved_usd >= len(granted) * ACTUAL_USD - 1e-9
        # The standby took over and decided: grants came after the kill.
        assert granted_after, "no call was granted after the leader died"

        # Exactly one row per call; what the killed replica had fetched comes back after its ack wait.
        deadline = time.monotonic() + INGESTED_WITHIN_S
        while usage_rows(ch, tenant) != (CALLS, CALLS):
            assert usage_rows(ch, tenant)[0] <= CALLS, "a usage row was doubled"
            assert time.monotonic() < deadline, f"usage rows: {usage_rows(ch, tenant)} of {CALLS}"
            await asyncio.sleep(0.1)
    finally:
        await bus.close()
        await operator.close()
        if standby.poll() is None:
            standby.terminate()
            standby.wait(15)
