"""SIGKILL the accountant process mid-stream and restart it: no usage row lost or doubled,
budgets (a virtual key's among them), outstanding reservations and a tripped switch intact.

The accountant runs as a real subprocess (`frugalmesh run accountant`) against the session's
nats-server and ClickHouse. Its tables live in the ClickHouse URL's database, which other tests
share, so every assertion filters on this test's own tenant (named after its subject prefix).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from clickhouse_connect.driver.client import Client
from helpers import budget_set, eventually
from mesh_client import request
from nats.js.api import AckPolicy, ConsumerConfig

from schemas.messages import (
    BudgetQuery,
    BudgetState,
    BudgetUpdate,
    KillSwitch,
    Reservation,
    ReservationDecision,
    UsageEvent,
)
from schemas.subjects import DURABLE_USAGE_INGEST, HEADER_MSG_ID, STREAM_USAGE
from services.accountant.rows import usd
from services.runtime.bus import encode, now_ms
from services.runtime.control import control_bucket
from services.runtime.settings import MeshSettings
from services.runtime.streams import ensure_streams

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[1]
# JetStream redelivers what the killed process fetched but never acked after this long.
ACK_WAIT_S = 2.0


# The accountant's ack_wait (create_app's default) plus room to ingest.
REDELIVERY_S = 45.0


class Accountant:
    """`python -m services.cli.main run accountant` as a child process."""

    def __init__(self, settings: MeshSettings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.process: subprocess.Popen | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        ready = self.tmp / f"ready-{self.starts}"
        env = {
            **os.environ,
            "NATS_URL": self.settings.nats_url,
            "CLICKHOUSE_URL": self.settings.clickhouse_url,
            "FRUGALMESH_SUBJECT_PREFIX": self.settings.subject_prefix,
        }
        log = (self.tmp / f"accountant-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "run", "accountant", "--ready-file", str(ready)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.process.poll() is None, (self.tmp / f"accountant-{self.starts}.log").read_text()
            assert time.monotonic() < deadline, "the accountant did not start"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def usage(i: int, tenant: str, rng: random.Random) -> UsageEvent:
    return UsageEvent(
        event_id=f"{tenant}-call-{i:05d}",
        time_ms=now_ms(),
        tenant=tenant,
        task_id=f"{tenant}-task-{i % 11}",
        call_id=f"{tenant}-call-{i:05d}",
        service="cloud-inference",
        tier="mid",
        provider="together",
        model="mixtral-8x7b",
        requested_model="mixtral-8x7b",
        input_tokens=100 + i,
        output_tokens=20,
        cost_usd=round(rng.uniform(0, 0.01), 9),
        outcome="ok",
    )


def stored(ch: Client, tenant: str) -> tuple[int, int, Decimal]:
    """(rows, distinct ids, total cost) of this tenant's usage rows, without FINAL: the raw truth."""
    return ch.query(
        "SELECT count(), uniqExact(event_id), sum(cost_usd) FROM usage_events WHERE tenant = {t:String}",
        parameters={"t": tenant},
    ).result_rows[0]


async def test_sigkill_mid_stream_loses_and_doubles_nothing(settings, nc, bus, ch, tmp_path):
    subjects = settings.subjects
    tenant = settings.subject_prefix
    js = nc.jetstream()
    await ensure_streams(js, subjects)
    # The durable ingest consumer, declared ahead with a short ack wait so the batch the killed
    # process held comes back within the test (the service keeps an existing consumer as it is).
    await js.add_consumer(
        subjects.stream(STREAM_USAGE),
        ConsumerConfig(
            durable_name=DURABLE_USAGE_INGEST,
            filter_subject=subjects.usage_all,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=4000,
        ),
    )
    accountant = Accountant(settings, tmp_path)
    try:
        await accountant.start()
        # Budget state before the crash: a run-time cap, an outstanding hold, a tripped switch.
        state = await request(
            nc, budget_set(subjects), BudgetUpdate(scope="tenant", key=tenant, day_usd=3.0, month_usd=50.0), BudgetState
        )
        assert state.error is None
        await request(nc, budget_set(subjects), BudgetUpdate(scope="model", key="m-capped", day_usd=0.01), BudgetState)
        # A virtual key of the tenant, capped at run time, whose hold must come back too.
        key = f"fmk_{tenant}"
        await request(nc, budget_set(subjects), BudgetUpdate(scope="key", key=key, day_usd=2.0), BudgetState)
        held = Reservation(
            id="held",
            tenant=tenant,
            task_id="t-held",
            model="m1",
            amount_usd=0.5,
            expires_ms=now_ms() + 600_000,
            key_id=key,
        )
        assert (await request(nc, subjects.budget_reserve, held, ReservationDecision)).granted
        spent = Reservation(
            id="spent",
            tenant=tenant,
            task_id="t-spent",
            model="m-capped",
            amount_usd=0.01,
            expires_ms=now_ms() + 600_000,
        )
        assert (await request(nc, subjects.budget_reserve, spent, ReservationDecision)).granted
        await request(nc, subjects.budget_settle, msgspec.structs.replace(spent, actual_usd=0.01), ReservationDecision)

        rng = random.Random(11)
        events = [usage(i, tenant, rng) for i in range(3000)]

        async def publish_all() -> None:
            for start in range(0, len(events), 100):
                await asyncio.gather(
                    *(
                        js.publish(subjects.usage(tenant), encode(e), headers={HEADER_MSG_ID: e.event_id})
                        for e in events[start : start + 100]
                    )
                )
                await asyncio.sleep(0.005)

        publishing = asyncio.create_task(publish_all())
        deadline = time.monotonic() + 30
        while stored(ch, tenant)[0] < 300:
            assert time.monotonic() < deadline, "ingest did not start"
            await asyncio.sleep(0.02)
        accountant.kill()
        at_kill = stored(ch, tenant)[0]
        await publishing
        assert at_kill < len(events), "the kill came too late to test anything"

        await accountant.start()
        expected = (len(events), len(events), sum(usd(e.cost_usd) for e in events))
        # What the killed accountant had fetched but not acked comes back after the consumers'
        # ack_wait (30 s): each wait below allows for that.
        deadline = time.monotonic() + REDELIVERY_S
        while stored(ch, tenant) != expected:
            assert stored(ch, tenant)[0] <= len(events), "a row was doubled"
            assert time.monotonic() < deadline, f"ingest did not catch up: {stored(ch, tenant)} != {expected}"
            await asyncio.sleep(0.05)

        state = await request(nc, subjects.budget_show, BudgetQuery(), BudgetState)
        caps = {(c.scope, c.key): (c.day_usd, c.month_usd) for c in state.caps}
        assert caps[("tenant", tenant)] == (3.0, 50.0) and caps[("model", "m-capped")] == (0.01, None)
        tenant_day = next(s for s in state.spend if (s.scope, s.key, s.window) == ("tenant", tenant, "day"))
        assert (tenant_day.settled_usd, tenant_day.reserved_usd) == pytest.approx((0.01, 0.5))
        assert caps[("key", key)] == (2.0, None)
        key_day = next(s for s in state.spend if (s.scope, s.key, s.window) == ("key", key, "day"))
        assert (key_day.settled_usd, key_day.reserved_usd, key_day.cap_usd) == pytest.approx((0.0, 0.5, 2.0))
        control = await control_bucket(bus)
        switch = msgspec.json.decode((await control.get("kill.model.m-capped")).value, type=KillSwitch)
        assert switch.tripped and switch.by == "accountant"
        again = Reservation(
            id="again", tenant=tenant, task_id="t2", model="m-capped", amount_usd=0.0, expires_ms=now_ms() + 60_000
        )
        refused = await request(nc, subjects.budget_reserve, again, ReservationDecision)
        assert not refused.granted and refused.reason.startswith("kill switch tripped (model m-capped)")

        # The trip's row arrives through its own consumer, which may still be catching up.
        def trip_recorded() -> bool:
            return ch.query(
                "SELECT count() FROM kill_events WHERE scope = 'model' AND key = 'm-capped' AND reason LIKE {r:String}",
                parameters={"r": "%" + "model m-capped day cap%"},
            ).result_rows == [(1,)]

        await eventually(trip_recorded, timeout_s=REDELIVERY_S, interval_s=0.05, message="the trip's row never came")
    finally:
        accountant.stop()
