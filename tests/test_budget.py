"""Budgets, reservations, the kill-switch authority and pacing, against a real nats-server and ClickHouse.

Each test runs its own accountant (own subject prefix, own ClickHouse database) with the caps it
passes in, and talks to it over plain nats-py as the router would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime
from pathlib import Path

import click
import msgspec
import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner
from helpers import budget_set, eventually
from mesh_client import request

from schemas.messages import (
    BudgetQuery,
    BudgetState,
    BudgetUpdate,
    KillSwitch,
    PaceSignal,
    Reservation,
    ReservationDecision,
)
from schemas.subjects import BUCKET_CONTROL, BUCKET_LEDGER, STREAM_LEDGER
from services.accountant.budget import BudgetConfig, Caps, PacingConfig
from services.accountant.ledger import pico
from services.cli.budget_commands import budget, clear, kill
from services.runtime.bus import now_ms
from services.runtime.control import ControlState, control_bucket, set_kill
from services.runtime.settings import MeshSettings

pytestmark = pytest.mark.infra


class FakeClock:
    """The accountant's clock, moved by the test (ms since the epoch)."""

    def __init__(self, start: datetime) -> None:
        self.now = int(start.timestamp() * 1000)

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


def caps(**scopes: dict[str, float]) -> BudgetConfig:
    """``caps(global_={"day": 1})``, ``caps(tenant_acme={"month": 10})``."""
    config = BudgetConfig(pacing=PacingConfig(interval_s=0.05))
    for name, windows in scopes.items():
        scope, _, key = name.partition("_")
        config.caps[(scope, key or "*")] = Caps(
            *(None if windows.get(w) is None else pico(windows[w]) for w in ("day", "month"))
        )
    return config


def reservation(
    i: int | str,
    amount: float,
    *,
    tenant: str = "acme",
    task: str = "task-1",
    model: str = "m1",
    expires_ms: int | None = None,
    task_budget: float | None = None,
    key: str = "",
) -> Reservation:
    return Reservation(
        id=f"call-{i}",
        tenant=tenant,
        task_id=task,
        model=model,
        amount_usd=amount,
        expires_ms=expires_ms or now_ms() + 60_000,
        task_budget_usd=task_budget,
        key_id=key,
    )


async def reserve(nc, settings: MeshSettings, r: Reservation) -> ReservationDecision:
    return await request(nc, settings.subjects.budget_reserve, r, ReservationDecision)


async def settle(nc, settings: MeshSettings, r: Reservation, actual: float | None) -> ReservationDecision:
    return await request(
        nc, settings.subjects.budget_settle, msgspec.structs.replace(r, actual_usd=actual), ReservationDecision
    )


async def show(nc, settings: MeshSettings, **query) -> BudgetState:
    return await request(nc, settings.subjects.budget_show, BudgetQuery(**query), BudgetState)


def spend(state: BudgetState, scope: str, key: str, window: str) -> tuple[float, float, float | None]:
    """(settled, reserved, cap) of one scope and window in the current period."""
    for s in state.spend:
        if (s.scope, s.key, s.window) == (scope, key, window):
            return s.settled_usd, s.reserved_usd, s.cap_usd
    return 0.0, 0.0, None


async def start_accountant(start_service, settings: MeshSettings, budgets: BudgetConfig | Path, **options):
    return await start_service(
        "accountant", settings, database=settings.subject_prefix, budgets=budgets, sweep_interval_s=0.02, **options
    )


async def test_1000_concurrent_calls_never_spend_past_a_1_dollar_cap(start_service, settings, nc):
    await start_accountant(start_service, settings, caps(global_={"day": 1.0}))
    worst = 0.002  # 1000 calls: $2 of demand against $1
    rng = random.Random(3)
    actuals = [round(worst * rng.uniform(0.5, 1.0), 9) for _ in range(1000)]
    decisions: list[ReservationDecision] = []
    settled_total = 0.0
    watching = True

    async def call(i: int) -> None:
        nonlocal settled_total
        r = reservation(i, worst, task=f"task-{i % 50}")
        decision = await reserve(nc, settings, r)
        decisions.append(decision)
        if decision.granted:
            await settle(nc, settings, r, actuals[i])
            settled_total += actuals[i]
            # What callers have been told is settled never passes the cap, after any settle.
            assert settled_total <= 1.0 + 1e-9

    async def watch() -> None:
        # The accountant's own books, sampled while the burst runs: settled + reserved <= cap.
        while watching:
            settled, reserved, cap = spend(await show(nc, settings), "global", "*", "day")
            assert cap == 1.0 and settled + reserved <= 1.0 + 1e-9
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(call(i) for i in range(1000)))
    watching = False
    await watcher

    granted = [d for d in decisions if d.granted]
    refused = [d for d in decisions if not d.granted]
    assert len(granted) + len(refused) == 1000
    assert 400 <= len(granted) < 1000 and refused
    assert all(d.reason.startswith("global day cap") and "would be exceeded" in d.reason for d in refused)
    settled, reserved, _ = spend(await show(nc, settings), "global", "*", "day")
    assert reserved == 0.0
    assert settled == pytest.approx(settled_total, abs=1e-9) and settled <= 1.0


async def test_an_unsettled_reservation_is_charged_at_its_deadline(start_service, settings, nc):
    clock = FakeClock(datetime(2025, 11, 20, 12, tzinfo=UTC))
    await start_accountant(start_service, settings, caps(tenant_acme={"day": 0.02}), clock=clock, expiry_grace_s=0)
    first = reservation(1, 0.01, expires_ms=clock.now + 5_000)
    assert (await reserve(nc, settings, first)).granted
    refused = await reserve(nc, settings, reservation(2, 0.02, expires_ms=clock.now + 60_000))
    assert not refused.granted and refused.reason.startswith("tenant acme day cap (2025-11-20) $0.020000")

    # Another tenant's hold, due 0.1 s before the first: the sweep that ends it runs at 4.9 s and
    # ends every hold then due, so once it is gone the first was kept by a sweep.
    earlier = reservation(3, 0.01, tenant="globex", expires_ms=clock.now + 4_800)
    assert (await reserve(nc, settings, earlier)).granted

    async def outstanding(count: int) -> bool:
        return (await show(nc, settings)).outstanding == count

    clock.advance(4.9)
    await eventually(lambda: outstanding(1), message="the sweep at 4.9 s did not release the other hold alone")
    assert spend(await show(nc, settings), "tenant", "acme", "day")[:2] == pytest.approx((0.0, 0.01))
    clock.advance(0.1)
    await eventually(lambda: outstanding(0))
    # Its call may have run, and no usage event says what it cost: charged its worst case, not released
    # (tests/test_money_safety.py has the charge taken from a usage event).
    assert spend(await show(nc, settings), "tenant", "acme", "day")[:2] == pytest.approx((0.01, 0.0))
    assert (await reserve(nc, settings, reservation(4, 0.01, expires_ms=clock.now + 60_000))).granted
    # A settle arriving after the charge counts as a repeat: never charged twice.
    assert (await settle(nc, settings, first, 0.004)).reason == "already settled"
    assert spend(await show(nc, settings), "tenant", "acme", "day")[:2] == pytest.approx((0.01, 0.01))


async def test_task_budget_and_model_cap(start_service, settings, nc):
    await start_accountant(start_service, settings, caps(model_m2={"day": 0.05}))
    assert (await reserve(nc, settings, reservation(1, 0.06, task_budget=0.1))).granted
    refused = await reserve(nc, settings, reservation(2, 0.06))  # the task's cap is remembered
    assert refused.reason.startswith("task task-1 budget $0.100000 would be exceeded")
    refused = await reserve(nc, settings, reservation(3, 0.06, task="task-2", model="m2"))
    assert refused.reason.startswith("model m2 day cap")
    assert (await reserve(nc, settings, reservation(4, 0.05, task="task-2", model="m2"))).granted


async def test_restart_keeps_budgets_and_outstanding_reservations(start_service, settings, nc):
    app = await start_accountant(start_service, settings, caps(global_={"day": 100.0}))
    state = await request(
        nc, budget_set(settings.subjects), BudgetUpdate(scope="tenant", key="acme", day_usd=0.05), BudgetState
    )
    assert state.error is None and spend(state, "tenant", "acme", "day")[2] == 0.05
    held = reservation(1, 0.03)
    assert (await reserve(nc, settings, held)).granted
    done = reservation(2, 0.01)
    assert (await reserve(nc, settings, done)).granted
    await settle(nc, settings, done, 0.008)
    await asyncio.wait_for(app.stop(), 10)

    await start_accountant(start_service, settings, caps(global_={"day": 100.0}))
    state = await show(nc, settings)
    assert state.outstanding == 1
    assert spend(state, "tenant", "acme", "day") == pytest.approx((0.008, 0.03, 0.05))
    refused = await reserve(nc, settings, reservation(3, 0.02))
    assert not refused.granted and refused.reason.startswith("tenant acme day cap")
    # The hold granted before the restart settles normally after it, once only.
    await settle(nc, settings, held, 0.02)
    await settle(nc, settings, held, 0.02)
    assert spend(await show(nc, settings), "tenant", "acme", "day") == pytest.approx((0.028, 0.0, 0.05))


async def test_a_hold_from_before_a_restart_that_expires_unsettled_is_charged(start_service, settings, nc):
    clock = FakeClock(datetime(2025, 11, 20, 12, tzinfo=UTC))
    options = {"clock": clock, "expiry_grace_s": 0}
    app = await start_accountant(start_service, settings, caps(), **options)
    assert (await reserve(nc, settings, reservation(1, 0.02, expires_ms=clock.now + 1_000))).granted
    await asyncio.wait_for(app.stop(), 10)
    await start_accountant(start_service, settings, caps(), **options)
    clock.advance(2)

    async def charged() -> bool:
        return spend(await show(nc, settings), "tenant", "acme", "day")[:2] == pytest.approx((0.02, 0.0))

    await eventually(charged)


async def test_a_grant_the_journal_cannot_store_is_withdrawn(start_service, settings, nc):
    await start_accountant(start_service, settings, caps(tenant_acme={"day": 0.05}))
    assert (await reserve(nc, settings, reservation(1, 0.01))).granted
    # Without its stream, a journal write is answered "no responders": nothing is stored.
    await nc.jetstream().delete_stream(settings.subjects.stream(STREAM_LEDGER))
    refused = await reserve(nc, settings, reservation(2, 0.01))
    assert not refused.granted and refused.reason.startswith("budget service unavailable: ledger unavailable")

    # The failed write ended the accountant's term; the next one rebuilds the ledger from what the
    # journal holds (nothing: its stream was deleted, and is declared again) and grants again.
    async def granted_again() -> bool:
        # A request that reaches the ending term's subscription is dropped with it: asked again after
        # a second, as the router's ReservationClient does (with the same id, so it counts once).
        try:
            return (
                await request(nc, settings.subjects.budget_reserve, reservation(3, 0.01), ReservationDecision, 1.0)
            ).granted
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):  # between two terms
            return False

    await eventually(granted_again)
    state = await show(nc, settings)
    assert state.outstanding == 1
    assert spend(state, "tenant", "acme", "day")[:2] == pytest.approx((0.0, 0.01))


async def test_crossing_a_cap_trips_the_switch_and_records_it(start_service, settings, nc, bus, ch):
    await start_accountant(start_service, settings, caps(tenant_acme={"day": 0.01}))
    r = reservation(1, 0.01)
    assert (await reserve(nc, settings, r)).granted
    await settle(nc, settings, r, 0.01)

    kv = await control_bucket(bus)

    async def tripped() -> bool:
        try:
            entry = await kv.get("kill.tenant.acme")
        except Exception:
            return False
        return msgspec.json.decode(entry.value, type=KillSwitch).tripped

    await eventually(tripped)
    switch = msgspec.json.decode((await kv.get("kill.tenant.acme")).value, type=KillSwitch)
    assert switch.by == "accountant"
    assert switch.reason.startswith("tenant acme day cap") and "reached: settled $0.010000" in switch.reason
    refused = await reserve(nc, settings, reservation(2, 0.0, task="task-2"))
    assert not refused.granted and refused.reason.startswith("kill switch tripped (tenant acme)")

    def recorded() -> bool:
        rows = ch.query(f"SELECT scope, key, tripped, by FROM {settings.subject_prefix}.kill_events").result_rows
        return rows == [("tenant", "acme", True, "accountant")]

    await eventually(recorded)


async def switch_of(kv, key: str) -> KillSwitch | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return msgspec.json.decode(entry.value, type=KillSwitch)


async def test_a_trip_is_written_until_it_lands_across_restarts_and_an_operators_clear_stands(
    start_service, settings, nc, bus
):
    budgets = caps(tenant_acme={"day": 0.01}, tenant_globex={"day": 0.01})
    first = await start_accountant(start_service, settings, budgets)
    kv = await control_bucket(bus)
    js = nc.jetstream()
    stream = f"KV_{settings.subjects.bucket(BUCKET_CONTROL)}"
    # JetStream refuses every write to the control bucket: it is full (discard new) at its present size.
    info = await js.stream_info(stream)
    await js.update_stream(dataclasses.replace(info.config, max_bytes=max(info.state.bytes, 1)))
    crossing = reservation(1, 0.01)
    assert (await reserve(nc, settings, crossing)).granted
    assert (await settle(nc, settings, crossing, 0.01)).granted
    await asyncio.wait_for(first.stop(), 15)  # the trip is journaled; its switch never landed
    assert await switch_of(kv, "kill.tenant.acme") is None

    # Writable again: the next term writes the trip the journal says never landed.
    await js.update_stream(dataclasses.replace(info.config, max_bytes=-1))
    second = await start_accountant(start_service, settings, budgets)

    async def acme_tripped() -> bool:
        switch = await switch_of(kv, "kill.tenant.acme")
        return switch is not None and switch.tripped and switch.by == "accountant"

    await eventually(acme_tripped)

    # An operator clears it; the trip landed, so no later term writes it again.
    await set_kill(bus, KillSwitch(scope="tenant", key="acme", tripped=False, reason="ok", by="operator", time_ms=0))
    await asyncio.wait_for(second.stop(), 15)
    await start_accountant(start_service, settings, budgets)
    other = reservation(2, 0.01, tenant="globex")
    assert (await reserve(nc, settings, other)).granted
    await settle(nc, settings, other, 0.01)

    async def globex_tripped() -> bool:
        switch = await switch_of(kv, "kill.tenant.globex")
        return switch is not None and switch.tripped

    # Switches are written in order: globex's trip comes after anything the term queued at its start.
    await eventually(globex_tripped)
    cleared = await switch_of(kv, "kill.tenant.acme")
    assert cleared is not None and not cleared.tripped and cleared.by == "operator"


async def test_cli_budget_set_show_kill_and_clear(start_service, settings, nc, ch):
    await start_accountant(start_service, settings, caps())
    cli = click.Group(commands={"budget": budget, "kill": kill, "clear": clear})
    env = {"NATS_URL": settings.nats_url, "FRUGALMESH_SUBJECT_PREFIX": settings.subject_prefix}

    def invoke(*args: str):
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    # click runs asyncio.run, so the commands go to a worker thread, away from the test's loop.
    await asyncio.to_thread(
        invoke, "budget", "set", "--scope", "tenant", "--key", "acme", "--day", "5", "--month", "100"
    )
    out = await asyncio.to_thread(invoke, "budget", "show", "--json")
    state = msgspec.json.decode(out, type=BudgetState)
    assert [(c.scope, c.key, c.day_usd, c.month_usd) for c in state.caps] == [("tenant", "acme", 5.0, 100.0)]
    assert "$5.000000" in await asyncio.to_thread(invoke, "budget", "show", "--scope", "tenant")

    await asyncio.to_thread(invoke, "kill", "--scope", "model", "--key", "m1", "--reason", "runaway")
    refused = await reserve(nc, settings, reservation(1, 0.001))
    assert not refused.granted and "(model m1): runaway" in refused.reason
    await asyncio.to_thread(invoke, "clear", "--scope", "model", "--key", "m1")

    async def granted() -> bool:
        return (await reserve(nc, settings, reservation(2, 0.001))).granted

    await eventually(granted)

    def both_recorded() -> bool:
        rows = ch.query(
            f"SELECT scope, key, tripped, reason FROM {settings.subject_prefix}.kill_events ORDER BY time"
        ).result_rows
        return rows == [("model", "m1", True, "runaway"), ("model", "m1", False, "operator clear")]

    await eventually(both_recorded)


async def test_pacing_downgrades_throttles_and_restores(start_service, settings, nc, bus):
    # Mid-November (30 days): the $10 month curve stands at $5.
    clock = FakeClock(datetime(2025, 11, 16, tzinfo=UTC))
    await start_accountant(start_service, settings, caps(tenant_acme={"month": 10.0}), clock=clock)
    kv = await control_bucket(bus)
    signals = await nc.subscribe(settings.subjects.control_pace)
    await nc.flush()

    async def pace_is(action: str) -> PaceSignal:
        async def check() -> bool:
            try:
                return msgspec.json.decode((await kv.get("pace.acme")).value, type=PaceSignal).action == action
            except Exception:
                return action == "normal"

        await eventually(check)
        return msgspec.json.decode((await kv.get("pace.acme")).value, type=PaceSignal)

    async def spend_usd(i: int, amount: float) -> None:
        r = reservation(i, amount, expires_ms=clock.now + 60_000)
        assert (await reserve(nc, settings, r)).granted
        await settle(nc, settings, r, amount)

    await spend_usd(1, 5.2)  # ahead by $0.2: within 5% of the cap
    await spend_usd(2, 0.8)  # $6 against $5: ahead by 10%
    # Pace signals go out one at a time, in the order decided: when the first is the one for $6,
    # none was decided for $5.20.
    first = msgspec.json.decode((await signals.next_msg(timeout=5)).data, type=PaceSignal)
    await signals.unsubscribe()
    assert (first.tenant, first.action) == ("acme", "downgrade")
    assert (first.spend_usd, first.curve_usd) == pytest.approx((6.0, 5.0))
    assert (await pace_is("downgrade")) == first
    await spend_usd(3, 2.0)  # $8: ahead by 30%
    await pace_is("throttle")
    clock.advance(9 * 86_400)  # Nov 25: the curve reaches $8
    await pace_is("normal")


# -- virtual keys: a key's caps bind like a tenant's, inside its tenant's --


async def test_key_caps_and_their_tenants_cap_all_hold_at_any_concurrency(start_service, settings, nc):
    # Three keys of one tenant, two capped in the file and one at run time; together their caps
    # pass the tenant's, so the tenant's cap binds as well as each key's.
    await start_accountant(
        start_service, settings, caps(tenant_acme={"day": 1.0}, key_fmk_a={"day": 0.3}, key_fmk_b={"day": 0.5})
    )
    update = BudgetUpdate(scope="key", key="fmk_c", day_usd=0.6)
    state = await request(nc, budget_set(settings.subjects), update, BudgetState)
    assert state.error is None and spend(state, "key", "fmk_c", "day")[2] == 0.6
    key_caps = {"fmk_a": 0.3, "fmk_b": 0.5, "fmk_c": 0.6}
    keys = list(key_caps)
    worst = 0.004  # 900 calls: $1.20 of demand per key
    rng = random.Random(5)
    actuals = [round(worst * rng.uniform(0.5, 1.0), 9) for _ in range(900)]
    refusals: dict[str, list[str]] = {key: [] for key in keys}
    settled_by_key = dict.fromkeys(keys, 0.0)
    watching = True

    async def call(i: int) -> None:
        key = keys[i % 3]
        r = reservation(i, worst, task=f"task-{i % 30}", key=key)
        decision = await reserve(nc, settings, r)
        if not decision.granted:
            refusals[key].append(decision.reason)
            return
        await settle(nc, settings, r, actuals[i])
        settled_by_key[key] += actuals[i]
        assert settled_by_key[key] <= key_caps[key] + 1e-9
        assert sum(settled_by_key.values()) <= 1.0 + 1e-9

    async def watch() -> None:
        while watching:
            state = await show(nc, settings)
            for scope, key, cap in (("tenant", "acme", 1.0), *(("key", k, c) for k, c in key_caps.items())):
                settled, reserved, shown = spend(state, scope, key, "day")
                assert shown == cap and settled + reserved <= cap + 1e-9, (scope, key, settled, reserved)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(call(i) for i in range(900)))
    watching = False
    await watcher

    tenant_refusals = ("tenant acme day cap", "kill switch tripped (tenant acme)")
    for key in keys:
        own = (f"key {key} day cap", f"kill switch tripped (key {key})", *tenant_refusals)
        assert refusals[key] and all(reason.startswith(own) for reason in refusals[key]), refusals[key][:3]
    # fmk_a's $0.30 fills first (at about $0.90 of the tenant's $1); the tenant's cap binds later.
    assert any(reason.startswith("key fmk_a day cap") for reason in refusals["fmk_a"])
    assert any(reason.startswith(tenant_refusals) for reasons in refusals.values() for reason in reasons)
    final = await show(nc, settings)
    for key, cap in key_caps.items():
        settled, reserved, _ = spend(final, "key", key, "day")
        assert reserved == 0.0 and settled == pytest.approx(settled_by_key[key], abs=1e-9) and settled <= cap
    settled, reserved, _ = spend(final, "tenant", "acme", "day")
    assert reserved == 0.0 and settled == pytest.approx(sum(settled_by_key.values()), abs=1e-9) and settled <= 1.0


async def test_a_crossed_key_cap_trips_that_keys_switch_alone(start_service, settings, nc, bus, ch):
    await start_accountant(start_service, settings, caps(key_fmk_a={"day": 0.01}))
    state = await ControlState.open(bus)
    try:
        r = reservation(1, 0.01, key="fmk_a")
        assert (await reserve(nc, settings, r)).granted
        await settle(nc, settings, r, 0.01)
        switch = await eventually(lambda: state.blocked(tenant="acme", task_id="task-2", model="m1", key_id="fmk_a"))
        assert (switch.scope, switch.key, switch.by) == ("key", "fmk_a", "accountant")
        assert switch.reason.startswith("key fmk_a day cap") and "reached: settled $0.010000" in switch.reason
        # Another key of the same tenant, and the tenant's calls made without a key, go on.
        assert state.blocked(tenant="acme", task_id="task-2", model="m1", key_id="fmk_b") is None
        assert state.blocked(tenant="acme", task_id="task-2", model="m1") is None
    finally:
        await state.close()

    tries = iter(range(100, 200))

    async def refused_by_the_switch() -> bool:
        # $0 fits the cap, so only the switch refuses it (once the accountant's own watch has it).
        decision = await reserve(nc, settings, reservation(next(tries), 0.0, task="task-2", key="fmk_a"))
        return not decision.granted and decision.reason.startswith("kill switch tripped (key fmk_a)")

    await eventually(refused_by_the_switch)
    assert (await reserve(nc, settings, reservation(2, 0.001, task="task-2", key="fmk_b"))).granted
    assert (await reserve(nc, settings, reservation(3, 0.001, task="task-2"))).granted

    def recorded() -> bool:
        rows = ch.query(f"SELECT scope, key, tripped, by FROM {settings.subject_prefix}.kill_events").result_rows
        return rows == [("key", "fmk_a", True, "accountant")]

    await eventually(recorded)


@pytest.mark.parametrize("snapshot_interval_s", [30.0, 0.0], ids=["journal", "snapshot"])
async def test_restart_keeps_key_caps_spend_and_holds(start_service, settings, nc, bus, snapshot_interval_s):
    """Replayed from the journal alone, or restored from a snapshot taken on every commit."""
    options = {"snapshot_interval_s": snapshot_interval_s}
    app = await start_accountant(start_service, settings, caps(), **options)
    update = BudgetUpdate(scope="key", key="fmk_a", day_usd=0.05, month_usd=1.0)
    assert (await request(nc, budget_set(settings.subjects), update, BudgetState)).error is None
    held = reservation(1, 0.03, key="fmk_a")
    assert (await reserve(nc, settings, held)).granted
    done = reservation(2, 0.01, key="fmk_a")
    assert (await reserve(nc, settings, done)).granted
    await settle(nc, settings, done, 0.008)
    other = reservation(3, 0.004, key="fmk_b")
    assert (await reserve(nc, settings, other)).granted
    await settle(nc, settings, other, 0.004)
    before = await show(nc, settings, scope="key")
    await asyncio.wait_for(app.stop(), 10)
    if snapshot_interval_s == 0.0:
        saved = await (await bus.object_store(settings.subjects.bucket(BUCKET_LEDGER))).get("snapshot")
        assert b'["key","fmk_a","day"' in saved.data

    await start_accountant(start_service, settings, caps(), **options)
    after = await show(nc, settings, scope="key")
    assert (after.caps, after.spend, after.outstanding) == (before.caps, before.spend, 1)
    assert spend(after, "key", "fmk_a", "day") == pytest.approx((0.008, 0.03, 0.05))
    assert spend(after, "key", "fmk_b", "month") == pytest.approx((0.004, 0.0, None))
    refused = await reserve(nc, settings, reservation(4, 0.02, key="fmk_a"))
    assert not refused.granted and refused.reason.startswith("key fmk_a day cap")
    await settle(nc, settings, held, 0.02)
    await settle(nc, settings, held, 0.02)
    assert spend(await show(nc, settings, scope="key"), "key", "fmk_a", "day") == pytest.approx((0.028, 0.0, 0.05))


async def test_cli_sets_shows_kills_and_clears_a_key(start_service, settings, nc):
    await start_accountant(start_service, settings, caps())
    cli = click.Group(commands={"budget": budget, "kill": kill, "clear": clear})
    env = {"NATS_URL": settings.nats_url, "FRUGALMESH_SUBJECT_PREFIX": settings.subject_prefix}

    def invoke(*args: str):
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    await asyncio.to_thread(invoke, "budget", "set", "--scope", "key", "--key", "fmk_x", "--day", "5")
    out = await asyncio.to_thread(invoke, "budget", "show", "--scope", "key", "--key", "fmk_x", "--json")
    state = msgspec.json.decode(out, type=BudgetState)
    assert [(c.scope, c.key, c.day_usd, c.month_usd) for c in state.caps] == [("key", "fmk_x", 5.0, None)]
    assert [(s.scope, s.key, s.window, s.cap_usd) for s in state.spend] == [("key", "fmk_x", "day", 5.0)]

    assert "kill switch tripped: key fmk_x" in await asyncio.to_thread(
        invoke, "kill", "--scope", "key", "--key", "fmk_x", "--reason", "leaked"
    )
    tries = iter(range(100, 200))

    async def refused() -> bool:  # once the accountant's watch has the switch
        decision = await reserve(nc, settings, reservation(next(tries), 0.001, key="fmk_x"))
        return not decision.granted and decision.reason == "kill switch tripped (key fmk_x): leaked"

    await eventually(refused)
    assert (await reserve(nc, settings, reservation(1, 0.001, key="fmk_y"))).granted
    await asyncio.to_thread(invoke, "clear", "--scope", "key", "--key", "fmk_x")

    async def granted() -> bool:
        return (await reserve(nc, settings, reservation(next(tries), 0.001, key="fmk_x"))).granted

    await eventually(granted)


async def test_the_budget_file_caps_keys_and_refuses_a_misspelt_table(start_service, settings, nc, tmp_path):
    path = tmp_path / "budgets.toml"
    path.write_text("[tenants.acme]\nday_usd = 1.0\n\n[keys.fmk_a]\nday_usd = 0.01\nmonth_usd = 0.5\n")
    await start_accountant(start_service, settings, path)
    state = await show(nc, settings, scope="key")
    assert [(c.scope, c.key, c.day_usd, c.month_usd) for c in state.caps] == [("key", "fmk_a", 0.01, 0.5)]
    refused = await reserve(nc, settings, reservation(1, 0.02, key="fmk_a"))
    assert not refused.granted and refused.reason.startswith("key fmk_a day cap")
    # [key.<id>] (singular) is not a table the accountant reads: it fails rather than cap nothing.
    path.write_text("[key.fmk_a]\nday_usd = 0.01\n")
    with pytest.raises(ValueError, match=r"unknown tables \['key'\]"):
        BudgetConfig.load(path)
