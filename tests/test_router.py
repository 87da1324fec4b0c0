"""The router through a live router service on a real nats-server.

The inference tier is a test peer (``InferencePeer``, plain nats-py) that records what the router
sends and answers it, so these tests see exactly which model each step was routed to. The
accountant's reservations are a granting test peer (``BudgetPeer``); refusals, the kill switch
and pacing are in test_enforcement.py.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from fakes.inference_peer import InferencePeer
from helpers import SHORT, make_step
from mesh_client import ask

from schemas.messages import (
    ChatMessage,
    ChatOptions,
    DeadLetter,
    ErrorInfo,
    FunctionCall,
    FunctionSpec,
    Rejection,
    StepRequest,
    Tool,
    ToolCall,
    UsageEvent,
)
from schemas.subjects import HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT
from services.router.cache import cache_key, cacheable
from services.routing.policies import PolicySet, UnknownPolicy
from services.routing.policies.fixed import FixedPolicy
from services.routing.table import PinningError, RoutingTable, pick_model, prompt_chars
from services.runtime.settings import REPO_DEPLOY_DIR
from services.runtime.tokens import count_message_tokens

LOCAL = "mixtral-8x7b-local"
MID = "mixtral-8x7b"
FRONTIER = "gpt-4-1106-preview"
LONG = "Summarise the following report. " + "The quarterly figures rose again in every region. " * 120


@pytest.fixture(scope="module")
def table() -> RoutingTable:
    return RoutingTable.load(REPO_DEPLOY_DIR)


@pytest.fixture
async def budget(settings, nc) -> BudgetPeer:
    """Grants every reservation, so paid calls go ahead."""
    return await BudgetPeer(nc, settings.subjects).start()


@pytest.fixture
def start_router(settings, start_service, nc, budget):
    """Starts the live router; call it after the test peer and listeners subscribed.

    nats-server 2.15.1 can answer the first request of a connection opened before a subscriber
    with "no responders" even after the subscriber flushed (about 1 in 15 with plain nats-py);
    so the router connects after the peer subscribes, and ``nc`` makes one round trip after the
    router subscribes.
    """

    async def start() -> None:
        await start_service("router", settings)
        await nc.flush()

    return start


async def next_usage(sub) -> UsageEvent:
    msg = await sub.next_msg(timeout=2)
    return msgspec.json.decode(msg.data, type=UsageEvent)


# -- the decision alone, no NATS --


@pytest.mark.unit
def test_a_policy_the_step_names_wins_and_is_built_once(table, catalog):
    raw = {"policies": {"tenants": {"acme": f"fixed:{FRONTIER}"}}}
    policies = PolicySet.parse(raw, table, catalog, REPO_DEPLOY_DIR)

    assert policies.for_step(make_step()) == FixedPolicy(FRONTIER)  # the tenant's
    named = policies.for_step(make_step(policy=f"fixed:{MID}"))
    assert named == FixedPolicy(MID) and policies.for_step(make_step(policy=f"fixed:{MID}")) is named
    assert policies.for_step(make_step(policy="rules")) is table
    for bad, why in [("smart", "unknown policy 'smart'"), ("fixed:gpt-9", "outside the catalogue")]:
        with pytest.raises(UnknownPolicy, match=why):
            policies.for_step(make_step(policy=bad))
    assert "smart" not in policies.named.built  # a refused name is not kept
    with pytest.raises(UnknownPolicy, match="no per-step policy"):
        PolicySet(default=table, tenants={}, workflows={}).for_step(make_step(policy="rules"))


@pytest.mark.unit
def test_pick_model_goes_up_the_ladder_then_down(catalog):
    assert pick_model("local", None, catalog).name == LOCAL
    assert pick_model("local", [FRONTIER], catalog).name == FRONTIER
    assert pick_model("local", [FRONTIER, MID], catalog).name == MID
    assert pick_model("frontier", [LOCAL, MID], catalog).name == MID
    with pytest.raises(PinningError):
        pick_model("mid", ["gpt-5"], catalog)
    with pytest.raises(PinningError):
        pick_model("mid", [], catalog)


@pytest.mark.unit
def test_table_rejects_a_bad_tier_and_unknown_keys():
    with pytest.raises(ValueError, match="tier"):
        RoutingTable.parse({"rules": [{"role": "draft", "tier": "cheap"}]})
    with pytest.raises(ValueError, match="unknown keys"):
        RoutingTable.parse({"rules": [{"roles": "draft", "tier": "local"}]})
    # A table written for token thresholds says what changed rather than routing without them.
    with pytest.raises(ValueError, match=r"unknown keys \['max_prompt_tokens'\]"):
        RoutingTable.parse({"rules": [{"max_prompt_tokens": 64, "tier": "local"}]})
    with pytest.raises(ValueError, match="min_prompt_chars 300 > max_prompt_chars 200"):
        RoutingTable.parse({"rules": [{"min_prompt_chars": 300, "max_prompt_chars": 200, "tier": "local"}]})


@pytest.mark.unit
def test_size_rules_count_the_characters_of_every_message(table, catalog):
    threshold = next(rule.max_prompt_chars for rule in table.rules if rule.max_prompt_chars)
    at_threshold = make_step("x" * threshold, role="solve", workflow="answer")
    assert prompt_chars(at_threshold) == threshold and table.choose(at_threshold, catalog).name == LOCAL
    with_system = make_step("x" * threshold, role="solve", workflow="answer")
    with_system.messages.insert(0, ChatMessage(role="system", content="Be brief."))
    assert table.choose(with_system, catalog).name == FRONTIER


@pytest.mark.unit
def test_cache_key_covers_model_and_limits():
    step = make_step()
    assert cache_key(LOCAL, step) == cache_key(LOCAL, make_step())
    assert cache_key(LOCAL, step) != cache_key(FRONTIER, step)
    assert cache_key(LOCAL, step) != cache_key(LOCAL, make_step(max_tokens=255))
    assert cache_key(LOCAL, step) != cache_key(LOCAL, make_step(response_schema={"type": "object"}))


TOOL = Tool(function=FunctionSpec(name="get_weather"))


@pytest.mark.unit
@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.5, "seed": 1},
        {"top_p": 0.5},
        {"seed": 3},
        {"stop": ["END"]},
        {"tools": [TOOL]},
        {"tools": [TOOL], "tool_choice": "required"},
        {"json_object": True},
    ],
    ids=lambda o: ",".join(o),
)
def test_cache_key_covers_every_option_that_changes_the_answer(options):
    plain = cache_key(LOCAL, make_step())
    assert cache_key(LOCAL, make_step(options=ChatOptions(**options))) != plain
    # Who asks does not change the answer; an explicit temperature 0 is the default.
    assert cache_key(LOCAL, make_step(options=ChatOptions(**options, user="u-9"))) == cache_key(
        LOCAL, make_step(options=ChatOptions(**options))
    )
    assert cache_key(LOCAL, make_step(options=ChatOptions(temperature=0.0, user="u-9"))) == plain


@pytest.mark.unit
def test_cache_key_covers_the_tool_fields_of_messages():
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments="{}"))
    asked = [ChatMessage(role="user", content=SHORT), ChatMessage(role="assistant", tool_calls=[call])]

    def with_messages(*messages: ChatMessage) -> StepRequest:
        return msgspec.structs.replace(make_step(), messages=list(messages))

    keys = {
        cache_key(LOCAL, with_messages(*asked, ChatMessage(role="tool", content="sunny", tool_call_id=i)))
        for i in ("call_1", "call_2")
    }
    named = with_messages(ChatMessage(role="user", content=SHORT, name="ann"))
    assert len(keys) == 2 and cache_key(LOCAL, named) != cache_key(LOCAL, make_step())
    assert cache_key(LOCAL, with_messages(*asked)) != cache_key(LOCAL, with_messages(asked[0]))


@pytest.mark.unit
def test_only_repeatable_answers_are_cached():
    assert cacheable(make_step()) and cacheable(make_step(options=ChatOptions(temperature=0.0)))
    assert cacheable(make_step(options=ChatOptions(temperature=0.8, seed=4)))
    assert not cacheable(make_step(options=ChatOptions(temperature=0.8)))


# -- through the live router --


@pytest.mark.infra
@pytest.mark.parametrize(
    ("role", "workflow", "content", "model"),
    [
        ("draft", "research", LONG, LOCAL),
        ("review", "answer", SHORT, FRONTIER),
        ("solve", "answer", SHORT, LOCAL),
        ("solve", "answer", LONG, FRONTIER),
    ],
    ids=["draft->local", "review->frontier", "short-answer->local", "long-answer->frontier"],
)
async def test_rules_route_to_the_tier_model(settings, start_router, nc, role, workflow, content, model):
    peer = await InferencePeer(nc, settings.subjects).start()
    await start_router()
    step = make_step(content, role=role, workflow=workflow)

    result = await ask(nc, settings, step)

    assert result.error is None and result.model == model
    assert result.output == f"answer from {model}" and result.cost_usd == 0.001 and not result.cache_hit
    [(request, headers)] = peer.requests
    assert request.model == model and request.call_id == result.call_id
    assert (request.task_id, request.step_id, request.tenant) == ("task-1", "step-1", "acme")
    assert request.messages == step.messages and request.max_tokens == 256
    assert headers[HEADER_DEADLINE] == str(step.deadline_ms)
    assert (headers[HEADER_TASK], headers[HEADER_TENANT]) == ("task-1", "acme")


@pytest.mark.infra
async def test_options_stream_to_key_and_agent_reach_the_call_and_the_key_its_reservation(
    settings, start_router, nc, budget
):
    peer = await InferencePeer(nc, settings.subjects).start()
    await start_router()
    options = ChatOptions(temperature=0.2, seed=5, stop=["END"], tools=[TOOL], tool_choice="auto", user="u-1")
    step = make_step(role="review", options=options, stream_to="_INBOX.caller.1", key_id="fmk_test", agent="critic")

    result = await ask(nc, settings, step)

    assert result.error is None and result.model == FRONTIER
    [(request, _)] = peer.requests
    assert (request.options, request.stream_to, request.key_id, request.agent) == (
        options,
        "_INBOX.caller.1",
        "fmk_test",
        "critic",
    )
    [reservation] = budget.reserved
    assert (reservation.id, reservation.key_id) == (result.call_id, "fmk_test")


@pytest.mark.infra
async def test_the_policy_a_step_names_routes_it_and_an_unknown_one_is_rejected(settings, start_router, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    dlq = await nc.subscribe(settings.subjects.dlq("router"))
    await start_router()

    routed = await ask(nc, settings, make_step(role="review", policy=f"fixed:{MID}"))  # the rules: frontier
    reply = await nc.request(settings.subjects.step_request, msgspec.json.encode(make_step(policy="smart")), timeout=5)

    assert routed.error is None and routed.model == MID and peer.models == [MID]
    rejection = msgspec.json.decode(reply.data, type=Rejection)
    assert rejection.error.kind == "invalid" and "unknown policy 'smart'" in rejection.error.message
    letter = msgspec.json.decode((await dlq.next_msg(timeout=2)).data, type=DeadLetter)
    assert "unknown policy 'smart'" in letter.error


@pytest.mark.infra
async def test_a_sampled_call_without_a_seed_is_never_cached(settings, start_router, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    await start_router()
    sampled = ChatOptions(temperature=0.9)

    results = [await ask(nc, settings, make_step(options=sampled)) for _ in range(2)]

    assert [r.cache_hit for r in results] == [False, False] and len(peer.requests) == 2


@pytest.mark.infra
async def test_allow_models_pins_the_model(settings, start_router, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    await start_router()

    drafted = await ask(nc, settings, make_step(role="draft", allow_models=[FRONTIER]))
    reviewed = await ask(nc, settings, make_step(role="review", allow_models=[LOCAL, MID]))

    assert (drafted.model, reviewed.model) == (FRONTIER, MID)
    assert peer.models == [FRONTIER, MID]


@pytest.mark.infra
async def test_no_allowed_model_is_a_pinning_error_and_no_call(settings, start_router, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    await start_router()

    result = await ask(nc, settings, make_step(allow_models=["gpt-5"]))

    assert result.error is not None and result.error.kind == "pinning"
    await nc.flush()
    assert peer.requests == []


@pytest.mark.infra
async def test_a_repeat_is_served_from_the_cache_at_zero_cost(settings, start_router, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    usage = await nc.subscribe(settings.subjects.usage_all)
    await start_router()

    first = await ask(nc, settings, make_step(agent="critic"))
    second = await ask(nc, settings, make_step(agent="critic"))

    assert peer.models == [LOCAL]
    assert not first.cache_hit and second.cache_hit
    assert second.call_id != first.call_id and second.cost_usd == 0.0
    assert (second.output, second.usage, second.model) == (first.output, first.usage, first.model)
    event = await next_usage(usage)
    assert (event.event_id, event.call_id, event.outcome, event.cost_usd) == (
        second.call_id,
        second.call_id,
        "cache_hit",
        0.0,
    )
    assert (event.service, event.model, event.task_id, event.step_id) == ("router", LOCAL, "task-1", "step-1")
    assert (event.input_tokens, event.output_tokens, event.agent) == (40, 7, "critic")


@pytest.mark.infra
async def test_error_results_are_not_cached(settings, start_router, nc):
    peer = await InferencePeer(nc, settings.subjects, error=ErrorInfo(kind="provider", message="boom")).start()
    await start_router()

    results = [await ask(nc, settings, make_step()) for _ in range(2)]

    assert [r.error.kind for r in results if r.error] == ["provider", "provider"]
    assert len(peer.requests) == 2


@pytest.mark.infra
async def test_no_responder_is_unavailable_and_metered_at_worst_case(settings, start_router, nc, catalog):
    usage = await nc.subscribe(settings.subjects.usage_all)
    await start_router()
    step = make_step(role="review", agent="critic")

    result = await ask(nc, settings, step)

    assert result.error is not None and result.error.kind == "unavailable" and result.model == FRONTIER
    frontier = catalog.model(FRONTIER)
    input_tokens = count_message_tokens(frontier.tokenizer, step.messages)
    worst_case = frontier.worst_case_cost(input_tokens, step.max_tokens)
    event = await next_usage(usage)
    assert (event.event_id, event.outcome, event.usage_source, event.agent) == (
        result.call_id,
        "error",
        "estimated",
        "critic",
    )
    assert event.cost_usd == pytest.approx(worst_case) and worst_case > 0
    assert (event.input_tokens, event.output_tokens) == (input_tokens, step.max_tokens)
    assert result.cost_usd == pytest.approx(worst_case)


@pytest.mark.infra
async def test_a_silent_inference_service_times_out_at_the_deadline(settings, start_router, nc):
    await InferencePeer(nc, settings.subjects, reply=False).start()
    usage = await nc.subscribe(settings.subjects.usage_all)
    await start_router()

    started = asyncio.get_running_loop().time()
    result = await ask(nc, settings, make_step(deadline_in_ms=300))
    waited = asyncio.get_running_loop().time() - started

    assert result.error is not None and result.error.kind == "timeout"
    assert 0.2 < waited < 2.0
    event = await next_usage(usage)
    assert (event.event_id, event.outcome, event.usage_source) == (result.call_id, "timeout", "estimated")
    assert event.cost_usd > 0


@pytest.mark.infra
async def test_invalid_step_is_rejected_and_dead_lettered(settings, start_router, nc):
    dlq = await nc.subscribe(settings.subjects.dlq("router"))
    await start_router()

    reply = await nc.request(settings.subjects.step_request, b'{"task_id": 7}', timeout=5)

    assert msgspec.json.decode(reply.data)["error"]["kind"] == "invalid"
    letter = msgspec.json.decode((await dlq.next_msg(timeout=2)).data, type=DeadLetter)
    assert (letter.service, letter.subject, letter.data) == (
        "router",
        settings.subjects.step_request,
        b'{"task_id": 7}',
    )
    assert "StepRequest" in letter.error
    # The service goes on: the next step still gets an answer.
    assert (await ask(nc, settings, make_step(allow_models=[]))).error.kind == "pinning"


@pytest.mark.unit
def test_the_worst_case_counts_tool_calls_and_the_tools_offered():
    """Tools are sent in the prompt and billed: a reservation that left them out could be passed."""
    from schemas.messages import ChatMessage, FunctionCall, FunctionSpec, Tool, ToolCall
    from services.runtime.tokens import count_message_tokens, count_prompt_tokens

    plain = [ChatMessage(role="user", content="What is the weather in Paris?")]
    call = ToolCall(id="c1", function=FunctionCall(name="weather", arguments='{"city": "Paris"}'))
    with_call = [*plain, ChatMessage(role="assistant", tool_calls=[call])]
    tools = [Tool(function=FunctionSpec(name="weather", parameters={"type": "object", "properties": {}}))]
    base = count_message_tokens("cl100k", plain)
    assert count_message_tokens("cl100k", with_call) > base + 5  # the call's JSON, not just overhead
    assert count_prompt_tokens("cl100k", plain, tools) > base + 5
    assert count_prompt_tokens("cl100k", plain, None) == base
