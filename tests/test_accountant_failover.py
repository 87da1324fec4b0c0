"""Several accountant replicas, one serving budgets: the lease (services/accountant/lease.py) and the
journal's fence (services/accountant/journal.py), with the accountants in this process on the
session's nats-server. The same under SIGKILL on a three-node cluster: tests/test_chaos.py."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
import pytest
from helpers import budget_set, eventually
from mesh_client import request

from schemas.messages import BudgetQuery, BudgetState, BudgetUpdate, Reservation, ReservationDecision
from schemas.subjects import BUCKET_ACCOUNTANT_LEASE, HEADER_EXPECTED_STREAM, LEASE_KEY, STREAM_LEDGER
from services.accountant.journal import JournalBatch
from services.accountant.ledger import Grant, pico
from services.runtime.bus import now_ms
from services.runtime.reservations import ReservationClient

pytestmark = pytest.mark.infra

TAKEOVER_S = 5.0  # the bound on a standby's takeover
# Longer than the tests' process can stall on a loaded machine: a lease lost to a stall would start
# a new term (safe, but not the term these tests follow). A graceful stop releases it at once.
LEASE_S = 15.0


def reservation(tenant: str, i: int, amount: float) -> Reservation:
    return Reservation(
        id=f"{tenant}-{i}", tenant=tenant, task_id="t", model="m1", amount_usd=amount, expires_ms=now_ms() + 120_000
    )


async def reserved_usd(nc, settings, tenant: str) -> tuple[float, float]:
    state = await request(nc, settings.subjects.budget_show, BudgetQuery(scope="tenant", key=tenant), BudgetState)
    day = next(s for s in state.spend if (s.scope, s.key, s.window) == ("tenant", tenant, "day"))
    return day.settled_usd, day.reserved_usd


async def granted(nc, settings, r: Reservation) -> bool:
    try:
        return (await request(nc, settings.subjects.budget_reserve, r, ReservationDecision)).granted
    except nats.errors.NoRespondersError:  # between two terms
        return False


async def test_a_write_by_another_leader_fences_the_journal_and_is_replayed(settings, start_service, nc):
    tenant = settings.subject_prefix
    await start_service("accountant", settings, lease_s=LEASE_S)
    await request(nc, budget_set(settings.subjects), BudgetUpdate(scope="tenant", key=tenant, day_usd=1.0), BudgetState)
    assert await granted(nc, settings, reservation(tenant, 1, 0.1))
    # A deposed leader that still believes it leads appends a grant of its own.
    foreign = reservation(tenant, 99, 0.5)
    batch = JournalBatch([Grant(foreign, pico(foreign.amount_usd), now_ms())])
    stream = settings.subjects.stream(STREAM_LEDGER)
    await nc.jetstream().publish(
        settings.subjects.ledger, msgspec.json.encode(batch), stream=stream, headers={HEADER_EXPECTED_STREAM: stream}
    )
    # The serving accountant's next write expected the sequence before that one: refused, not granted.
    refused = await request(nc, settings.subjects.budget_reserve, reservation(tenant, 2, 0.1), ReservationDecision)
    assert not refused.granted and refused.reason.startswith("budget service unavailable: ledger unavailable")
    # Its next term rebuilt the ledger from the journal, the other writer's grant included, and decides on it.
    await eventually(lambda: granted(nc, settings, reservation(tenant, 3, 0.1)), message="no new term")
    assert await reserved_usd(nc, settings, tenant) == pytest.approx((0.0, 0.7))
    over = await request(nc, settings.subjects.budget_reserve, reservation(tenant, 4, 0.31), ReservationDecision)
    assert not over.granted and "would be exceeded" in over.reason


async def test_one_replica_serves_and_a_standby_takes_over_when_it_stops(settings, start_service, nc, bus):
    tenant = settings.subject_prefix
    first = await start_service("accountant", settings, lease_s=LEASE_S)
    second = await start_service("accountant", settings, lease_s=LEASE_S)  # ready once it saw the first renew
    lease = await bus.key_value(settings.subjects.bucket(BUCKET_ACCOUNTANT_LEASE))
    leader = (await lease.get(LEASE_KEY)).value
    await request(nc, budget_set(settings.subjects), BudgetUpdate(scope="tenant", key=tenant, day_usd=0.3), BudgetState)
    client = ReservationClient(bus)
    grants = [await client.reserve(reservation(tenant, i, 0.1), 10) for i in range(2)]
    assert all(g.granted for g in grants)

    stopped = time.monotonic()
    await asyncio.wait_for(first.stop(), 15)
    # The standby's first answer: the stopped leader gave up its lease, the standby rebuilt the ledger.
    after = await client.reserve(reservation(tenant, 2, 0.1), TAKEOVER_S)
    takeover_s = time.monotonic() - stopped
    assert after.granted, after.reason
    assert takeover_s < TAKEOVER_S
    assert (await lease.get(LEASE_KEY)).value != leader
    # The holds granted by the first leader still count: the cap is full.
    full = await client.reserve(reservation(tenant, 3, 0.1), TAKEOVER_S)
    assert not full.granted and "would be exceeded" in full.reason
    assert await reserved_usd(nc, settings, tenant) == pytest.approx((0.0, 0.3))
    await asyncio.wait_for(second.stop(), 15)
