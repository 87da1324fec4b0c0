"""Usage events and settles survive a NATS outage (services/runtime/outbox.py): what the bus cannot take
waits on disk, in order, and is sent until it lands, also by the next run of the process; and a
nats-server stopped and started again in the middle of a replay loses no task, no usage row and no
settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import stat
import time
import uuid
from urllib.parse import urlparse

import msgspec
import nats.errors
import pytest
from clickhouse_connect.driver.client import Client

from loadtest.deploy import LOADTEST_MODELS, loadtest_deploy_dir
from loadtest.replay import Live, ReplayOptions, replay
from loadtest.traces import read_trace, resolve_trace
from schemas.messages import BudgetQuery, BudgetState, Reservation, UsageEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_USAGE
from services.embedded.servers import EmbeddedNats
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.outbox import Outbox
from services.runtime.reservations import ReservationClient
from services.runtime.settings import MeshSettings

pytestmark = pytest.mark.infra

SERVICES = ("artifact-store", "accountant", "cloud-inference", "local-inference", "router", "planner")
# How long the nats-server stays down: longer than a settle's failover window (5 s), so without the
# outbox the settles of calls that end meanwhile are lost.
OUTAGE_S = 6.0
DRAINED_WITHIN_S = 30.0
# The accountant takes back what it had fetched when the server stopped after its ack wait (30 s).
INGESTED_WITHIN_S = 45.0
CALLS_IN_OUTAGE = 5
WORST_CASE_USD = 0.01
ACTUAL_USD = 0.004


@pytest.fixture
def home_settings(settings, tmp_path) -> MeshSettings:
    """The test's settings with a home of its own, where the outbox file goes."""
    return settings.model_copy(update={"home": tmp_path / "home"})


def usage_event(i: int, tenant: str) -> UsageEvent:
    return UsageEvent(
        event_id=f"{tenant}-{i}", time_ms=now_ms(), tenant=tenant, task_id="t", call_id=f"{tenant}-{i}",
        service="cloud-inference", tier="mid", provider="together", model="mixtral-8x7b",
        requested_model="mixtral-8x7b", cost_usd=0.001 * i, outcome="ok",
    )  # fmt: skip


async def stored_usage_ids(bus: Bus) -> list[str]:
    """The event ids in the usage stream, in the order it stored them."""
    stream = bus.subjects.stream(STREAM_USAGE)
    info = await bus.jetstream.stream_info(stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        stored = await bus.jetstream.get_msg(stream, seq)
        ids.append(stored.headers[HEADER_MSG_ID] if stored.headers else "")
    return ids


async def until_drained(outbox: Outbox) -> None:
    deadline = time.monotonic() + DRAINED_WITHIN_S
    while any(outbox.waiting().values()):
        assert time.monotonic() < deadline, f"the outbox still holds {outbox.waiting()}"
        await asyncio.sleep(0.1)


async def test_usage_events_the_bus_refuses_wait_on_disk_and_land_in_order_once_after_a_restart(home_settings):
    settings = home_settings
    tenant = "ob" + uuid.uuid4().hex[:6]
    events = [usage_event(i, tenant) for i in range(5)]
    first_run = Bus(settings, "meter")
    await first_run.connect()
    # No usage stream yet: JetStream answers "no responders", as while its server is away.
    for event in events:
        await first_run.publish_usage(event)
    assert first_run.outbox.waiting() == {"usage": 5, "settle": 0}
    await first_run.close()  # the process ends with its events unsent: they stay on disk
    assert stat.S_IMODE(first_run.outbox.path.stat().st_mode) == 0o600

    setup = Bus(settings, "test")
    await setup.connect()
    try:
        await setup.declare_streams()
        # Event 2's first try was stored, its acknowledgement lost: the resend must not store it again.
        subject = settings.subjects.usage(tenant)
        stream = settings.subjects.stream(STREAM_USAGE)
        await setup.jetstream.publish(
            subject, encode(events[2]), stream=stream, headers={HEADER_MSG_ID: events[2].event_id}
        )
        second_run = Bus(settings, "meter")
        await second_run.connect()  # sends what the first run left
        try:
            await until_drained(second_run.outbox)
        finally:
            await second_run.close()
        ids = [e.event_id for e in events]
        assert await stored_usage_ids(setup) == [ids[2], ids[0], ids[1], ids[3], ids[4]]
    finally:
        await setup.close()


async def show_day(bus: Bus, tenant: str) -> tuple[float, float]:
    """The accountant's settled and reserved USD of ``tenant`` today (asked again while no accountant
    serves: one whose lease lapsed in an outage takes it back)."""
    deadline = time.monotonic() + DRAINED_WITHIN_S
    while True:
        try:
            query = BudgetQuery(scope="tenant", key=tenant)
            state = await bus.request(bus.subjects.budget_show, query, BudgetState, 10)
            break
        except nats.errors.NoRespondersError:
            assert time.monotonic() < deadline, "no accountant serves budgets"
            await asyncio.sleep(0.25)
    day = [s for s in state.spend if (s.scope, s.key, s.window) == ("tenant", tenant, "day")]
    return (day[0].settled_usd, day[0].reserved_usd) if day else (0.0, 0.0)


async def test_a_settle_no_accountant_answered_is_sent_from_disk_until_one_does_and_counted_once(
    home_settings, start_service
):
    settings = home_settings
    tenant = "ob" + uuid.uuid4().hex[:6]
    bus = Bus(settings, "router")
    await bus.connect()
    try:
        await bus.declare_streams()
        client = ReservationClient(bus, failover_s=0.2)
        reservations = holds(tenant, 2, amount_usd=0.01, expires_in_s=60)
        # No accountant: each settle goes to the outbox; the first one is settled twice (a retry).
        for reservation in (*reservations, reservations[0]):
            await client.settle(reservation, 0.004)
        assert bus.outbox.waiting() == {"usage": 0, "settle": 3}
        await start_service("accountant", settings)
        await until_drained(bus.outbox)
        settled, reserved = await show_day(bus, tenant)
        assert settled == pytest.approx(0.008) and reserved == 0
    finally:
        await bus.close()


async def test_a_full_outbox_keeps_what_it_holds_and_names_each_entry_it_drops(home_settings, capfd):
    settings = home_settings
    tenant = "ob" + uuid.uuid4().hex[:6]
    events = [usage_event(i, tenant) for i in range(4)]
    bus = Bus(settings, "meter")
    await bus.connect()
    bus.outbox = Outbox(bus.outbox.path, bus, max_bytes=2 * len(encode(events[0])) + 8)
    try:
        for event in events:  # no stream: every one is for the outbox, which has room for two
            await bus.publish_usage(event)
        assert bus.outbox.waiting() == {"usage": 2, "settle": 0}
        logged = capfd.readouterr().err
        assert logged.count("outbox_full") == 1
        dropped = [line for line in logged.splitlines() if "outbox_dropped" in line]
        assert len(dropped) == 2 and events[2].event_id in dropped[0] and events[3].event_id in dropped[1]
    finally:
        await bus.outbox.stop()
        await bus.close()


# -- a nats-server stopped and started again in the middle of a replay --


@pytest.fixture
def own_nats(tmp_path):
    """A nats-server of this test's own (the test stops it): the session's is shared."""
    server = EmbeddedNats(tmp_path / "nats", port=-1)
    server.start()
    yield server
    server.stop()


def restart(server: EmbeddedNats) -> None:
    """Start ``server`` again on the same port and JetStream store."""
    server.port = urlparse(server.url).port or 0
    server.start()


async def rows_once_ingested(bus: Bus, ch: Client, tenant: str) -> tuple[int, int, float, int]:
    """The tenant's usage rows (count, distinct event ids, USD) once the accountant has ingested every
    event the usage stream holds for it (what it had in flight at the stop comes back after its ack wait)."""
    stream = bus.subjects.stream(STREAM_USAGE)
    subject = bus.subjects.usage(tenant)
    deadline = time.monotonic() + INGESTED_WITHIN_S
    while True:
        info = await bus.jetstream.stream_info(stream, subjects_filter=subject)
        stored = (info.state.subjects or {}).get(subject, 0)
        count, ids, usd = ch.query(
            "SELECT count(), uniqExact(event_id), toFloat64(sum(cost_usd)) FROM usage_events WHERE tenant = {t:String}",
            parameters={"t": tenant},
        ).result_rows[0]
        if count >= stored or time.monotonic() > deadline:
            return count, ids, usd, stored
        await asyncio.sleep(0.25)


@pytest.mark.slow
async def test_a_nats_server_stopped_mid_replay_loses_no_task_row_or_settle(
    own_nats, infra, data_dir, tmp_path, start_service, ch: Client, capfd
):
    deploy = loadtest_deploy_dir(tmp_path / "deploy")
    models = re.sub(
        r"(?m)^(output|prefill)_tokens_per_s = .*$", r"\1_tokens_per_s = 100000", LOADTEST_MODELS.read_text()
    )
    (deploy / "models.toml").write_text(re.sub(r"(?m)^ttft_ms = .*$", "ttft_ms = 2", models))
    settings = MeshSettings(
        nats_url=own_nats.url, clickhouse_url=infra[1], subject_prefix="ob" + uuid.uuid4().hex[:8], data=data_dir,
        deploy_dir=deploy, home=tmp_path / "home", log_level="WARNING",
    )  # fmt: skip
    for service in SERVICES:
        await start_service(service, settings)
    tenant, own_tenant = "ob" + uuid.uuid4().hex[:6], "ob" + uuid.uuid4().hex[:6]
    rows = read_trace(resolve_trace("azure-code", data_dir), limit=40)
    span = rows[-1].arrival_s - rows[0].arrival_s
    options = ReplayOptions(speed=max(1.0, span / 8.0), tenant=tenant, deadline_s=25, drain_s=10, salt=uuid.uuid4().hex)
    some_ended = asyncio.Event()

    def on_tick(live: Live) -> None:
        if live.finished >= 5:
            some_ended.set()

    replaying = asyncio.create_task(replay(settings, rows, options, on_tick))
    await asyncio.wait_for(some_ended.wait(), 60)
    # Beside the replay, calls reserved before the stop that end while the server is down, metered and
    # settled as the router does, by a process that then stops before the server is back (a deploy,
    # a crash loop): its next run, started after, sends what it could not.
    caller = Bus(settings, "router")
    await caller.connect()
    reserved_before = await reserve_calls(caller, own_tenant)
    own_nats.stop()  # SIGTERM: the clients' connections drop with what was in flight
    ending = asyncio.create_task(end_calls(caller, reserved_before))
    await asyncio.sleep(OUTAGE_S)
    # The process dies: whatever it was doing stops, its connection goes with what it buffered, and
    # only the outbox's file stays.
    ending.cancel()
    await asyncio.gather(ending, return_exceptions=True)
    await caller.outbox.stop()
    with contextlib.suppress(ConnectionResetError):  # nats-py's close of a connection that is down
        await caller._nc.close()
    assert caller._nc.is_closed
    restart(own_nats)
    next_run = Bus(settings, "router")
    await next_run.connect()
    report = await asyncio.wait_for(replaying, 120)
    await until_drained(next_run.outbox)
    await next_run.close()
    bus = Bus(settings, "test")
    await bus.connect()
    try:
        count, ids, usd, stored = await rows_once_ingested(bus, ch, tenant)
        own_count, _, own_usd, _ = await rows_once_ingested(bus, ch, own_tenant)
        settled, reserved = await show_day(bus, tenant)
        own_settled, own_reserved = await show_day(bus, own_tenant)
        left = {path.name: Outbox(path, bus).waiting() for path in (settings.home / "outbox").glob("*.sqlite3")}
    finally:
        await bus.close()
    logged = capfd.readouterr().err
    handed = {kind: logged.count(f'"{kind}_to_outbox"') for kind in ("usage", "settle")}
    print(
        f"OUTBOX outage_s={OUTAGE_S} outcomes={report.outcomes} reasons={report.not_done_reasons} "
        f"calls_reported={report.zero_loss.calls_reported} rows={count} stored={stored} to_outbox={handed} "
        f"settled_usd={settled:.6f} rows_usd={usd:.6f} left={left}"
    )
    # Every task ended: done, or failed with its reason.
    assert report.published == len(rows) and report.zero_loss.missing == 0
    assert all(reason.split(": ", 1)[1] for reason in report.not_done_reasons), report.not_done_reasons
    # Every call has exactly one usage row, and every stored event is a row; nothing waits in an outbox.
    assert count == ids == stored >= report.zero_loss.calls_reported
    assert all(waiting == {"usage": 0, "settle": 0} for waiting in left.values()), left
    # Every reservation was settled: no hold left open, and nothing metered went uncharged. (A call whose
    # reply the outage lost is settled at its worst case by the router, above the row its inference
    # service metered: spend may pass the rows' sum, never fall below it.)
    assert reserved == 0
    assert settled >= usd - 1e-9
    # The calls that ended in the outage: one row each, each settled at its actual cost.
    assert own_count == CALLS_IN_OUTAGE
    assert (own_settled, own_reserved) == (pytest.approx(own_usd), 0)
    assert own_usd == pytest.approx(CALLS_IN_OUTAGE * ACTUAL_USD)


def holds(tenant: str, count: int, *, amount_usd: float, expires_in_s: float) -> list[Reservation]:
    """``count`` reservations of ``tenant``'s calls, ids ``<tenant>-<i>``."""
    expires_ms = now_ms() + int(expires_in_s * 1000)
    return [
        Reservation(
            id=f"{tenant}-{i}",
            tenant=tenant,
            task_id="t",
            model="mixtral-8x7b",
            amount_usd=amount_usd,
            expires_ms=expires_ms,
        )  # fmt: skip
        for i in range(count)
    ]


async def reserve_calls(bus: Bus, tenant: str) -> list[Reservation]:
    client = ReservationClient(bus)
    reservations = holds(tenant, CALLS_IN_OUTAGE, amount_usd=WORST_CASE_USD, expires_in_s=300)
    for reservation in reservations:
        assert (await client.reserve(reservation, time_left_s=10)).granted
    return reservations


async def end_calls(bus: Bus, reservations: list[Reservation]) -> None:
    """Meter and settle each call, as the router does when a call ends."""
    client = ReservationClient(bus)

    def metered(r: Reservation) -> UsageEvent:
        return msgspec.structs.replace(usage_event(0, r.tenant), event_id=r.id, call_id=r.id, cost_usd=ACTUAL_USD)

    await asyncio.gather(
        *(bus.publish_usage(metered(r)) for r in reservations), *(client.settle(r, ACTUAL_USD) for r in reservations)
    )
