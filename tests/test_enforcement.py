"""The cost defences where calls are made, on live services and a real nats-server: reservations
(the accountant is a test peer, ``BudgetPeer``, which signs grants as the accountant does), grants
in both inference services, the kill switch in the router and in both inference services, pinning,
strict pinning and pacing.

A paid call sent straight to an inference service, as the probes below do, carries a grant signed
as the accountant signs it (fakes/grants.py); without one it is refused (tests/test_grants.py has
every other way a grant fails)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from fakes.grants import granted
from fakes.inference_peer import InferencePeer
from helpers import eventually, make_request, make_step, shipped_catalog
from helpers import kill_switch as switch
from helpers import pace_signal as pace
from mesh_client import ask, call, usage_events

from schemas.messages import DeadLetter, InferenceResult, UsageEvent
from schemas.subjects import HEADER_BUDGET
from services.runtime.bus import encode
from services.runtime.control import set_kill, set_pace
from services.runtime.data import load_recorded_outcomes
from services.runtime.streams import ensure_streams
from services.runtime.tokens import count_message_tokens

pytestmark = pytest.mark.infra

LOCAL = "mixtral-8x7b-local"
MID = "mixtral-8x7b"
FRONTIER = "gpt-4-1106-preview"
CATALOG = shipped_catalog()
QUESTION = "What is six times seven?"



def usage_by_id(events: list[UsageEvent]) -> dict[str, UsageEvent]:
    """Usage events by event id (= call id)."""
    return {e.event_id: e for e in events}


async def until_error(probe: Callable[[], Awaitable[InferenceResult]], kind: str | None) -> InferenceResult:
    """Probe until a result's error kind is ``kind`` (None: no error); switches arrive pushed, in ms."""
    last: list[InferenceResult] = []

    async def matches() -> InferenceResult | None:
        last[:] = [await probe()]
        return last[0] if (last[0].error.kind if last[0].error else None) == kind else None

    return await eventually(matches, timeout_s=3, interval_s=0.01, message=lambda: f"still {last[0].error} after 3 s")


# -- reservations, through the live router with test peers for the accountant and inference --


async def test_a_refused_reservation_stops_the_call_and_is_metered_once(settings, start_service, nc):
    budget = await BudgetPeer(nc, settings.subjects, refuse="tenant acme: day cap $1.00 reached").start()
    inference = await InferencePeer(nc, settings.subjects).start()
    await start_service("router", settings)
    await nc.flush()
    step = make_step(QUESTION, role="review")

    result = await ask(nc, settings, step, headers={HEADER_BUDGET: "0.25"})

    assert result.error is not None and result.error.kind == "refused"
    assert (result.error.message, result.error.retryable) == ("tenant acme: day cap $1.00 reached", False)
    assert (result.model, result.cost_usd) == (FRONTIER, 0)
    await nc.flush()
    assert inference.requests == [] and budget.settled == []
    [reservation] = budget.reserved
    frontier = CATALOG.model(FRONTIER)
    worst_case = frontier.worst_case_cost(count_message_tokens(frontier.tokenizer, step.messages), step.max_tokens)
    assert (reservation.id, reservation.tenant, reservation.task_id, reservation.model) == (
        result.call_id,
        "acme",
        "task-1",
        FRONTIER,
    )
    assert reservation.amount_usd == pytest.approx(worst_case) and worst_case > 0
    assert (reservation.expires_ms, reservation.task_budget_usd) == (step.deadline_ms, 0.25)
    events = await usage_events(nc, settings)
    assert [(e.event_id, e.service, e.outcome, e.cost_usd) for e in events] == [
        (result.call_id, "router", "refused", 0)
    ]


async def test_without_an_accountant_paid_calls_fail_closed(settings, start_service, nc):
    inference = await InferencePeer(nc, settings.subjects).start()
    await start_service("router", settings)
    await nc.flush()

    result = await ask(nc, settings, make_step(QUESTION))

    assert result.error is not None
    assert (result.error.kind, result.error.message, result.error.retryable) == (
        "refused",
        "budget service unavailable",
        True,
    )
    await nc.flush()
    assert inference.requests == []
    [event] = await usage_events(nc, settings)
    assert (event.outcome, event.cost_usd) == ("refused", 0)


async def test_a_granted_call_carries_its_reservation_and_settles_the_actual_cost(settings, start_service, nc):
    budget = await BudgetPeer(nc, settings.subjects).start()
    inference = await InferencePeer(nc, settings.subjects).start()
    await start_service("router", settings)
    await nc.flush()

    result = await ask(nc, settings, make_step(QUESTION))

    assert result.error is None and result.cost_usd == 0.001
    [(request, _)] = inference.requests
    [reservation] = budget.reserved
    [settled] = budget.settled
    assert request.reservation_id == reservation.id == settled.id == result.call_id
    assert request.grant == budget.signer.grant(reservation)  # the accountant's grant, carried as it came
    assert reservation.task_budget_usd is None and reservation.actual_usd is None
    assert settled.actual_usd == 0.001 and settled.amount_usd == reservation.amount_usd


async def test_an_unreadable_task_budget_is_rejected_before_any_reservation(settings, start_service, nc):
    budget = await BudgetPeer(nc, settings.subjects).start()
    dlq = await nc.subscribe(settings.subjects.dlq("router"))
    await start_service("router", settings)
    await nc.flush()

    reply = await nc.request(
        settings.subjects.step_request, encode(make_step(QUESTION)), timeout=5, headers={HEADER_BUDGET: "lots"}
    )

    assert msgspec.json.decode(reply.data)["error"]["kind"] == "invalid"
    letter = msgspec.json.decode((await dlq.next_msg(timeout=2)).data, type=DeadLetter)
    assert HEADER_BUDGET in letter.error
    assert budget.reserved == []


# -- (b) the kill switch, in the router and both inference services (replay backends) --


async def start_mesh(settings, start_service, nc) -> None:
    await BudgetPeer(nc, settings.subjects).start()
    for service in ("local-inference", "cloud-inference", "router"):
        await start_service(service, settings)
    await nc.flush()


def probes(nc, settings, prompts, tenant: str = "acme") -> dict[str, Callable[[], Awaitable[InferenceResult]]]:
    """One fresh paid call per service: a step through the router, and one straight to each inference service."""
    subjects = settings.subjects
    return {
        "router": lambda: ask(nc, settings, make_step(next(prompts), role="draft", tenant=tenant)),
        "local-inference": lambda: call(
            nc, subjects.infer_local(LOCAL), granted(make_request(LOCAL, next(prompts), tenant=tenant))
        ),
        "cloud-inference": lambda: call(
            nc, subjects.infer_cloud("openai"), granted(make_request(FRONTIER, next(prompts), tenant=tenant))
        ),
    }


async def test_a_paid_call_sent_straight_to_an_inference_service_without_a_grant_is_refused_and_metered_once(
    settings, start_service, nc, prompts
):
    await start_mesh(settings, start_service, nc)
    subjects = settings.subjects
    straight = {
        "local-inference": (subjects.infer_local(LOCAL), make_request(LOCAL, next(prompts))),
        "cloud-inference": (subjects.infer_cloud("openai"), make_request(FRONTIER, next(prompts))),
    }

    results = {name: await call(nc, subject, request) for name, (subject, request) in straight.items()}

    for result in results.values():
        assert result.error is not None and result.error.kind == "refused"
        assert result.error.message == "no valid grant: the call carries no grant"
        assert (result.output, result.cost_usd) == ("", 0)
    events = await usage_events(nc, settings)
    assert sorted((e.event_id, e.service, e.outcome, e.cost_usd) for e in events) == sorted(
        (request.call_id, name, "refused", 0) for name, (_, request) in straight.items()
    )


async def test_a_global_trip_stops_every_service_and_a_clear_restores_them(settings, start_service, nc, prompts, bus):
    await start_mesh(settings, start_service, nc)
    services = probes(nc, settings, prompts)
    for probe in services.values():
        assert (await probe()).error is None

    await set_kill(bus, switch())
    killed = {name: await until_error(probe, "killed") for name, probe in services.items()}

    events = usage_by_id(await usage_events(nc, settings))
    for name, result in killed.items():
        assert "kill switch tripped (global *): test trip" in result.error.message
        event = events[result.call_id]
        assert (event.service, event.outcome, event.cost_usd, event.output_tokens) == (name, "killed", 0, 0)
    await set_kill(bus, switch(tripped=False))
    for probe in services.values():
        await until_error(probe, None)


async def test_a_tenant_trip_stops_that_tenant_only(settings, start_service, nc, prompts, bus):
    await start_mesh(settings, start_service, nc)
    await set_kill(bus, switch("tenant", "acme"))

    for probe in probes(nc, settings, prompts, tenant="acme").values():
        await until_error(probe, "killed")
    for probe in probes(nc, settings, prompts, tenant="globex").values():
        assert (await probe()).error is None


async def test_services_started_after_a_trip_refuse_their_first_call(settings, start_service, nc, prompts, bus):
    js = nc.jetstream()
    # Nothing of the mesh runs yet: the trip's writer declares the streams, as the CLI does.
    await ensure_streams(js, settings.subjects)
    await set_kill(bus, switch())
    await start_mesh(settings, start_service, nc)

    for name, probe in probes(nc, settings, prompts).items():
        result = await probe()
        assert result.error is not None and result.error.kind == "killed", name


# -- (b) a call in flight, on cloud-inference's openai backend against a loopback fake API --


async def test_a_trip_cancels_covered_calls_in_flight_and_meters_them_killed(
    openai_settings, start_service, nc, fake_openai, bus
):
    settings = openai_settings
    fake_openai.behaviour.reply = "word " * 30
    fake_openai.behaviour.token_delay_s = 0.02  # about 0.65 s a call
    await start_service("cloud-inference", settings)
    subject = settings.subjects.infer_cloud("openai")
    doomed = granted(make_request(FRONTIER, "Count slowly.", tenant="acme", max_tokens=300))
    spared = granted(make_request(FRONTIER, "Count slowly.", tenant="globex", max_tokens=300))
    calls = [asyncio.create_task(call(nc, subject, r)) for r in (doomed, spared)]
    await eventually(lambda: len(fake_openai.requests) >= 2, interval_s=0.01)

    await set_kill(bus, switch("tenant", "acme"))
    killed, finished = await asyncio.gather(*calls)

    assert killed.error is not None and killed.error.kind == "killed"
    assert "cancelled in flight" in killed.error.message and killed.output == ""
    assert await asyncio.to_thread(fake_openai.disconnects.wait, 5), "the provider never saw the stream closed"
    assert finished.error is None and finished.output == ("word " * 30).rstrip()
    events = usage_by_id(await usage_events(nc, settings))
    event = events[doomed.call_id]
    worst_case = CATALOG.model(FRONTIER).worst_case_cost(count_message_tokens("cl100k", doomed.messages), 300)
    assert (event.outcome, event.usage_source, event.output_tokens) == ("killed", "estimated", 300)
    assert event.cost_usd == pytest.approx(worst_case) == killed.cost_usd
    assert events[spared.call_id].outcome == "ok"


# -- (e) pinning --


async def test_no_allowed_candidate_is_a_pinning_error_with_nothing_reserved_or_called(settings, start_service, nc):
    budget = await BudgetPeer(nc, settings.subjects).start()
    inference = await InferencePeer(nc, settings.subjects).start()
    await start_service("router", settings)
    await nc.flush()

    result = await ask(nc, settings, make_step(QUESTION, allow_models=["gpt-5", "claude-x"]))

    assert result.error is not None and result.error.kind == "pinning"
    await nc.flush()
    assert (budget.reserved, inference.requests) == ([], [])


async def test_strict_pinning_fails_a_call_the_provider_ran_on_another_model(
    openai_settings, start_service, nc, fake_openai
):
    settings = openai_settings.model_copy(update={"strict_pinning": True})
    fake_openai.behaviour.model = "gpt-4-0613"
    await start_service("cloud-inference", settings)
    request = granted(make_request(FRONTIER, QUESTION))

    result = await call(nc, settings.subjects.infer_cloud("openai"), request)

    assert result.error is not None and result.error.kind == "pinning"
    assert "gpt-4-0613" in result.error.message and result.output == ""
    assert (result.model, result.provider_model) == (FRONTIER, "gpt-4-0613")
    [event] = await usage_events(nc, settings)
    assert (event.outcome, event.model, event.requested_model) == ("error", "gpt-4-0613", FRONTIER)
    assert event.output_tokens == 4 and event.cost_usd == pytest.approx(result.cost_usd) and event.cost_usd > 0


# -- (f) pacing --


async def test_downgrade_moves_a_tier_down_within_the_allow_list_and_normal_restores(settings, start_service, nc, bus):
    await BudgetPeer(nc, settings.subjects).start()
    inference = await InferencePeer(nc, settings.subjects).start()
    js = nc.jetstream()
    await ensure_streams(js, settings.subjects)
    await set_pace(bus, pace("acme", "downgrade"))
    await start_service("router", settings)
    await nc.flush()

    downgraded = await ask(nc, settings, make_step("First?", role="review"))
    pinned = await ask(nc, settings, make_step("Second?", role="review", allow_models=[FRONTIER]))
    other_tenant = await ask(nc, settings, make_step("Third?", role="review", tenant="globex"))

    assert (downgraded.model, pinned.model, other_tenant.model) == (MID, FRONTIER, FRONTIER)
    await set_pace(bus, pace("acme", "normal"))

    # Until the signal arrives the step routes to MID again: a free cache hit, no call.
    async def restored() -> bool:
        return (await ask(nc, settings, make_step("First?", role="review"))).model == FRONTIER

    await eventually(restored, timeout_s=3, interval_s=0.01, message="still downgraded 3 s after the pace went normal")
    assert inference.models == [MID, FRONTIER, FRONTIER, FRONTIER]


async def test_throttle_spaces_a_tenants_paid_calls_and_refuses_one_past_its_deadline(settings, start_service, nc, bus):
    await BudgetPeer(nc, settings.subjects).start()
    inference = await InferencePeer(nc, settings.subjects).start()
    await ensure_streams(nc.jetstream(), settings.subjects)
    await set_pace(bus, pace("acme", "throttle"))
    await start_service("router", settings, throttle_rate_per_s=10.0, throttle_burst=1)
    await nc.flush()

    started = time.monotonic()
    results = await asyncio.gather(*(ask(nc, settings, make_step(f"Question {i}?", role="review")) for i in range(4)))
    elapsed = time.monotonic() - started
    late = await ask(nc, settings, make_step("One more?", role="review", deadline_in_ms=50))
    free_tenant = await ask(nc, settings, make_step("Question 0?", role="review", tenant="globex"))

    # Slots at 0, 0.1, 0.2 and 0.3 s, each a tier down (frontier -> mid).
    assert [r.error for r in results] == [None] * 4 and {r.model for r in results} == {MID}
    assert 0.25 < elapsed < 1.5
    assert late.error is not None and late.error.kind == "refused" and "throttled" in late.error.message
    assert free_tenant.error is None and free_tenant.model == FRONTIER
    assert len(inference.requests) == 5
