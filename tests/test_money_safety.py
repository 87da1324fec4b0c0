"""No crash lets spend escape a cap (issue 16, item 5), on a real nats-server and ClickHouse.

- A router that dies between its call and its settle: the hold, at its expiry, is charged the call's
  metered cost from the usage stream (the worst case when there is no usage event), and a settle
  that comes after that counts nothing more (services/accountant/usage_watch.py).
- JetStream refusing journal writes (the ledger stream full): grants stop, refused as retryable;
  settles are still answered, and land once JetStream takes writes again (journal.py).
- The accountant SIGKILLed after settles were answered but before they were stored: after the
  replay, reserved plus settled stays under the cap and the settled spend is all there, taken from
  the usage stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Iterator

import msgspec
import pytest
from fakes.grants import reservation_of
from helpers import eventually, make_request
from mesh_client import call, request, usage_events
from nats.js.api import DiscardPolicy
from test_accountant_crash import Accountant

from schemas.messages import BudgetQuery, BudgetState, Reservation, ReservationDecision, UsageEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_LEDGER, STREAM_USAGE
from services.accountant.budget import BudgetConfig, Caps
from services.accountant.ledger import dollars, pico
from services.runtime.bus import encode, now_ms
from services.runtime.data import load_recorded_outcomes
from services.runtime.grants import PUBLIC_KEY_ENV, SEED_ENV, SEED_FILE_ENV, GrantSigner, new_seed
from services.runtime.reservations import ReservationClient
from services.runtime.settings import REPO_DEPLOY_DIR, MeshSettings
from services.runtime.streams import ensure_streams

pytestmark = pytest.mark.infra

FRONTIER = "gpt-4-1106-preview"
UNAVAILABLE_LEDGER = "budget service unavailable: ledger unavailable"




def tenant_cap(tenant: str, day_usd: float) -> BudgetConfig:
    config = BudgetConfig()
    config.caps[("tenant", tenant)] = Caps(day=pico(day_usd))
    return config


def hold(i: int, amount: float, expires_in_s: float = 60.0) -> Reservation:
    return Reservation(
        id=f"call-{i}",
        tenant="acme",
        task_id="t",
        model="m1",
        amount_usd=amount,
        expires_ms=now_ms() + int(expires_in_s * 1000),
    )


async def reserve(nc, settings: MeshSettings, r: Reservation) -> ReservationDecision:
    return await request(nc, settings.subjects.budget_reserve, r, ReservationDecision)


async def settle(nc, settings: MeshSettings, r: Reservation, actual: float) -> ReservationDecision:
    settled = msgspec.structs.replace(r, actual_usd=actual)
    return await request(nc, settings.subjects.budget_settle, settled, ReservationDecision)


async def acme_day(nc, settings: MeshSettings) -> tuple[float, float, int]:
    """acme's (settled, reserved) today, and the holds outstanding."""
    state = await request(nc, settings.subjects.budget_show, BudgetQuery(scope="tenant", key="acme"), BudgetState)
    day = next(s for s in state.spend if (s.scope, s.key, s.window) == ("tenant", "acme", "day"))
    return day.settled_usd, day.reserved_usd, state.outstanding


async def no_holds(nc, settings: MeshSettings) -> bool:
    return (await acme_day(nc, settings))[2] == 0


async def refuse_ledger_writes(nc, settings: MeshSettings) -> None:
    """JetStream refuses every further journal write: the stream is full at its present size (discard new)."""
    js = nc.jetstream()
    info = await js.stream_info(settings.subjects.stream(STREAM_LEDGER))
    config = dataclasses.replace(info.config, max_bytes=max(info.state.bytes, 1), discard=DiscardPolicy.NEW)
    await js.update_stream(config)


async def take_ledger_writes(nc, settings: MeshSettings) -> None:
    js = nc.jetstream()
    info = await js.stream_info(settings.subjects.stream(STREAM_LEDGER))
    await js.update_stream(dataclasses.replace(info.config, max_bytes=-1))


async def test_a_hold_its_router_never_settled_is_charged_the_metered_cost_of_its_call(
    signer, start_service, settings, nc, prompts
):
    # The router's part, played here: reserve, call inference with the grant, then die before the settle.
    ran = make_request(FRONTIER, next(prompts), max_tokens=200)
    other = make_request(FRONTIER, next(prompts), max_tokens=200)
    cap = dollars(pico(reservation_of(ran).amount_usd) + pico(reservation_of(other).amount_usd)) + 0.001
    await start_service(
        "accountant",
        settings,
        database=settings.subject_prefix,
        budgets=tenant_cap("acme", cap),
        sweep_interval_s=0.02,
        expiry_grace_s=0.2,
    )
    await start_service("cloud-inference", settings)
    # Deadlines (so the holds' expiries) 3 s from now, once the services run.
    ran = msgspec.structs.replace(ran, deadline_ms=now_ms() + 3_000)
    held, unused = reservation_of(ran), reservation_of(msgspec.structs.replace(other, deadline_ms=now_ms() + 3_000))
    decision = await reserve(nc, settings, held)
    assert decision.granted, decision.reason
    # A second call reserved and never made (the router died before sending it): no usage event.
    assert (await reserve(nc, settings, unused)).granted
    sent = msgspec.structs.replace(ran, reservation_id=held.id, grant=decision.grant)
    result = await call(nc, settings.subjects.infer_cloud("openai"), sent)
    assert result.error is None and 0 < result.cost_usd < held.amount_usd

    settled, reserved, _ = await acme_day(nc, settings)
    assert (settled, reserved) == pytest.approx((0.0, held.amount_usd + unused.amount_usd))
    assert settled + reserved <= cap

    # Past the deadline (and its grace): both holds end, nothing settled them.
    await eventually(lambda: no_holds(nc, settings), timeout_s=10, message="the holds did not expire")
    [event] = await usage_events(nc, settings)
    assert (event.call_id, event.outcome) == (ran.call_id, "ok")
    settled, reserved, _ = await acme_day(nc, settings)
    assert reserved == 0.0
    # The call that ran at its metered cost, the call never made at its worst case: never released at $0.
    assert settled == pytest.approx(event.cost_usd + unused.amount_usd, abs=1e-9)
    assert settled <= cap
    # The dead router's settle, delivered late (an outbox): a repeat, not a second charge.
    late = await settle(nc, settings, held, result.cost_usd)
    assert (late.granted, late.reason) == (True, "already settled")
    assert (await acme_day(nc, settings))[:2] == pytest.approx((settled, 0.0))


async def test_grants_stop_while_jetstream_refuses_journal_writes_and_no_settle_is_lost(start_service, settings, nc):
    options = {"database": settings.subject_prefix, "budgets": tenant_cap("acme", 1.0), "sweep_interval_s": 0.02}
    app = await start_service("accountant", settings, **options)
    first, second = hold(1, 0.1), hold(2, 0.1)
    assert (await reserve(nc, settings, first)).granted and (await reserve(nc, settings, second)).granted

    await refuse_ledger_writes(nc, settings)
    # Settles are still answered: one below its hold (at once), one above it (once its write failed).
    assert (await settle(nc, settings, first, 0.05)).granted
    assert (await settle(nc, settings, second, 0.15)).granted
    refused = await reserve(nc, settings, hold(3, 0.01))
    assert not refused.granted and refused.reason.startswith(UNAVAILABLE_LEDGER), refused.reason
    await asyncio.sleep(1.0)  # several retries later: still refused, still counted
    refused = await reserve(nc, settings, hold(4, 0.01))
    assert not refused.granted and refused.reason.startswith(UNAVAILABLE_LEDGER), refused.reason
    assert (await acme_day(nc, settings))[:2] == pytest.approx((0.2, 0.0))

    await take_ledger_writes(nc, settings)

    async def granted_again() -> bool:
        return (await reserve(nc, settings, hold(5, 0.1))).granted

    await eventually(granted_again, message="grants did not resume once the journal took writes")
    # Stored in order: the settles went before the grant above, so the journal has them. A new term
    # reads them back from it.
    await asyncio.wait_for(app.stop(), 15)
    await start_service("accountant", settings, **options)
    assert await acme_day(nc, settings) == pytest.approx((0.2, 0.1, 1))


async def test_a_router_asks_again_while_the_journal_cannot_store_and_is_granted_once_it_can(
    start_service, settings, nc, bus
):
    """What a cluster's leader election looks like to a router: the accountant refuses reserves for a
    moment because JetStream refuses its journal's writes. The router's client asks again (same id)
    within its failover window instead of failing the call."""
    options = {"database": settings.subject_prefix, "budgets": tenant_cap("acme", 1.0), "sweep_interval_s": 0.02}
    await start_service("accountant", settings, **options)
    await refuse_ledger_writes(nc, settings)
    withdrawn = await reserve(nc, settings, hold(1, 0.1))  # its write is refused: the journal is unhealthy now
    assert not withdrawn.granted and withdrawn.reason.startswith(UNAVAILABLE_LEDGER), withdrawn.reason

    asked = asyncio.create_task(ReservationClient(bus).reserve(hold(2, 0.1), time_left_s=30))
    await asyncio.sleep(1.0)  # refused a few times meanwhile
    await take_ledger_writes(nc, settings)

    decision = await asked
    assert decision.granted, decision.reason
    assert (await acme_day(nc, settings))[:2] == pytest.approx((0.0, 0.1))


@pytest.mark.slow  # two starts of an accountant process
async def test_an_accountant_killed_before_its_answered_settles_were_stored_loses_no_spend(
    settings, nc, tmp_path, monkeypatch
):
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_DEPLOY_DIR, deploy)
    (deploy / "budgets.toml").write_text("[tenants.acme]\nday_usd = 1.0\n")
    monkeypatch.setenv("FRUGALMESH_DEPLOY_DIR", str(deploy))
    js = nc.jetstream()
    await ensure_streams(js, settings.subjects)
    accountant = Accountant(settings, tmp_path)
    try:
        await accountant.start()
        journaled = hold(0, 0.1)
        assert (await reserve(nc, settings, journaled)).granted
        assert (await settle(nc, settings, journaled, 0.03)).granted
        # Granted after that settle, so stored after it: the settle is in the journal.
        calls = [hold(i, 0.2, expires_in_s=6.0) for i in range(1, 5)]
        for r in calls:
            assert (await reserve(nc, settings, r)).granted
        metered = {r.id: 0.05 for r in calls[:3]}  # what the inference service metered; the 4th never ran
        for r in calls[:3]:
            event = usage_of(r, metered[r.id])
            stream = settings.subjects.stream(STREAM_USAGE)
            await js.publish(
                settings.subjects.usage("acme"), encode(event), stream=stream, headers={HEADER_MSG_ID: r.id}
            )

        await refuse_ledger_writes(nc, settings)
        for r in calls[:3]:  # answered at once; their journal writes are refused, retried, never stored
            assert (await settle(nc, settings, r, metered[r.id])).granted
        assert (await acme_day(nc, settings))[:2] == pytest.approx((0.18, 0.2))
        accountant.kill()
        await take_ledger_writes(nc, settings)

        await accountant.start()
        # The settles were lost with the process: their holds are back, and still fit the cap.
        settled, reserved, _ = await acme_day(nc, settings)
        assert settled + reserved <= 1.0 and settled >= 0.03
        await eventually(lambda: no_holds(nc, settings), timeout_s=15, message="the restored holds were not reconciled")
        # The journaled settle, the three metered calls at their metered cost, the 4th at its worst case.
        assert (await acme_day(nc, settings))[:2] == pytest.approx((0.03 + 3 * 0.05 + 0.2, 0.0))
    finally:
        accountant.stop()


def usage_of(r: Reservation, cost_usd: float) -> UsageEvent:
    return UsageEvent(
        event_id=r.id,
        time_ms=now_ms(),
        tenant=r.tenant,
        task_id=r.task_id,
        call_id=r.id,
        service="cloud-inference",
        tier="frontier",
        provider="openai",
        model=r.model,
        requested_model=r.model,
        input_tokens=100,
        output_tokens=20,
        cost_usd=cost_usd,
        outcome="ok",
    )
