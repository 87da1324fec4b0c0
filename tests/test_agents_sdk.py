"""The Python agent SDK (frugalmesh.agents) and its shipped agents, against a real nats-server and the real
artifact store. Requests are sent as the planner sends them (an ``AgentRequest`` on ``mesh.agent.<name>``);
the router is ``RouterTestPeer`` (the ``router_peers`` fixture), except in the runaway test, which runs the
real router, inference service and accountant, because there the mesh itself must stop the agent."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid

import msgspec
import nats.errors
import pytest
from fakes.openai_server import Behaviour
from fakes.router_peer import result
from helpers import SHORT, eventually, new_task
from mesh_client import artifact, put_artifact, request, stream_messages, submit, usage_events

from frugalmesh.agents import Agent, CallRefused, Context
from frugalmesh.agents.shipped import debate, fixer
from schemas.messages import (
    AgentRequest,
    AgentResult,
    Artifact,
    ChatMessage,
    DeadLetter,
    ErrorInfo,
    InferenceResult,
    Rejection,
    StepRequest,
    UsageEvent,
)
from schemas.subjects import HEADER_BUDGET, HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT, STREAM_DLQ
from services.runtime.agents import agent_instances
from services.runtime.bus import Bus, now_ms
from services.runtime.data import load_recorded_outcomes

GARBAGE = b"\x00not json{"
SCHEMA_INVALID = b'{"task_id": 5, "agent": ["not", "a", "string"]}'


# The tenant of the requests below: the agent reads and stores artifacts as this tenant's.
TENANT = "acme"


def agent_request(agent: str, **fields) -> AgentRequest:
    """A request as the planner sends it: a fresh task, 30 s to the deadline (``fields`` override)."""
    defaults = {
        "task_id": uuid.uuid4().hex[:12],
        "step_id": "solve",
        "tenant": TENANT,
        "workflow": "solve",
        "goal": SHORT,
        "artifact": "answer",
        "deadline_ms": now_ms() + 30_000,
    }
    return AgentRequest(agent=agent, **{**defaults, **fields})


async def ask(nc, settings, message: AgentRequest, timeout_s: float = 15.0) -> AgentResult:
    return await request(nc, settings.subjects.agent(message.agent), message, AgentResult, timeout_s)


# -- agents under test --

echo = Agent("echo", version="1.0.0", consumes=["text"], produces=["answer"])


@echo.handler
async def _echo(ctx: Context):
    first = await ctx.llm([{"role": "user", "content": ctx.goal}])
    again = [ChatMessage(role="user", content=ctx.goal), {"role": "user", "content": f"Again: {first.output}"}]
    second = await ctx.llm(again, max_tokens=64, role="check")
    return await ctx.put("answer", {"text": second.output, "model": second.model}, parents=ctx.inputs)


careful = Agent("careful", produces=["answer"])


@careful.handler
async def _careful(ctx: Context):
    """Drafts, stores the draft, then checks it: what happens to a refused check is the params' choice."""
    draft = await ctx.llm([{"role": "user", "content": ctx.goal}])
    best = await ctx.put("answer", {"text": draft.output, "model": draft.model})
    if ctx.params.get("crash"):
        raise RuntimeError("the agent's own bug")
    try:
        await ctx.llm([{"role": "user", "content": ctx.goal}, {"role": "user", "content": "Check it."}])
    except CallRefused as refused:
        if not ctx.params.get("catch"):
            raise
        note = f"kept the draft: {refused.error.kind}: {refused.error.message}"
        return await ctx.put("answer", {"text": note, "model": draft.model}, parents=[best])
    return best


sleepy = Agent("sleepy", max_concurrency=3)
running = {"now": 0, "most": 0}


@sleepy.handler
async def _sleepy(ctx: Context):
    running["now"] += 1
    running["most"] = max(running["most"], running["now"])
    try:
        await asyncio.sleep(0.3)
    finally:
        running["now"] -= 1
    return None


reader = Agent("reader", consumes=["text"], produces=["answer"])


@reader.handler
async def _reader(ctx: Context):
    """Answers with the text of its input, read as the request's tenant."""
    source = await ctx.get(ctx.inputs[0])
    return await ctx.put("answer", {"text": source.body["text"], "model": "none"})


# -- the SDK --


@pytest.mark.infra
async def test_an_agent_answers_with_its_stored_artifact_its_calls_and_their_cost(
    settings, nc, start_service, start_agent, router_peers
):
    await start_service("artifact-store", settings)
    answered: list[InferenceResult] = []

    def respond(step: StepRequest) -> InferenceResult:
        answered.append(result(step, f"17 (call {step.attempt})", cost_usd=0.002))
        return answered[-1]

    await router_peers(settings, respond)
    await start_agent(echo, settings)
    source = (await put_artifact(nc, settings, Artifact(type="text", tenant=TENANT, body={"text": SHORT}))).ref
    assert source is not None
    message = agent_request("echo", inputs=[source])

    reply = await ask(nc, settings, message)

    assert reply.error is None
    assert reply.calls == [r.call_id for r in answered] and len(reply.calls) == 2
    assert reply.cost_usd == pytest.approx(0.004)
    [ref] = reply.artifacts
    stored = await artifact(nc, settings, ref.id, TENANT)
    assert (stored.type, stored.task_id, stored.step_id) == ("answer", message.task_id, "solve")
    assert stored.body["text"] == "17 (call 2)" and stored.parents == [source.id]
    assert stored.calls == reply.calls and stored.cost_usd == pytest.approx(0.004)


@pytest.mark.infra
async def test_an_agent_reads_artifacts_only_as_its_requests_tenant(settings, nc, start_service, start_agent):
    await start_service("artifact-store", settings)
    await start_agent(reader, settings)
    stored = await put_artifact(nc, settings, Artifact(type="text", tenant="globex", body={"text": "globex's plan"}))

    theirs = await ask(nc, settings, agent_request("reader", tenant="globex", inputs=[stored.ref]))
    assert theirs.error is None
    assert (await artifact(nc, settings, theirs.artifacts[0].id, "globex")).body["text"] == "globex's plan"
    # The same input in acme's request: the agent asks as acme, and the store answers "not found".
    posing = await ask(nc, settings, agent_request("reader", tenant=TENANT, inputs=[stored.ref]))
    assert posing.error is not None and "not found" in posing.error.message


@pytest.mark.infra
async def test_its_calls_are_calls_of_the_task_named_after_the_agent(settings, nc, start_agent, router_peers):
    peer = await router_peers(settings, lambda step: result(step, "17"))
    await start_agent(echo, settings)
    message = agent_request("echo", task_budget_usd=1e-05, budget_left_usd=1e-05, allow_models=["mixtral-8x7b-local"])

    await ask(nc, settings, message)  # the artifact store is not running: the put fails, the calls were made

    assert [s.attempt for s in peer.requests] == [1, 2]
    for step, headers in zip(peer.requests, peer.headers, strict=True):
        assert (step.agent, step.task_id, step.step_id, step.tenant, step.workflow) == (
            "echo", message.task_id, "solve", "acme", "solve"
        )  # fmt: skip
        assert step.allow_models == ["mixtral-8x7b-local"] and step.deadline_ms == message.deadline_ms
        assert step.messages[0] == ChatMessage(role="user", content=SHORT)
        assert headers[HEADER_TASK] == message.task_id and headers[HEADER_TENANT] == "acme"
        assert headers[HEADER_DEADLINE] == str(message.deadline_ms)
        assert headers[HEADER_BUDGET] == "0.00001"  # the task's cap as a decimal, as the planner sends it
    assert [s.role for s in peer.requests] == ["agent", "check"] and peer.requests[1].max_tokens == 64


@pytest.mark.infra
async def test_a_refused_call_reaches_the_agent_and_an_uncaught_one_is_the_results_error(
    settings, nc, start_service, start_agent, router_peers
):
    await start_service("artifact-store", settings)

    def respond(step: StepRequest) -> InferenceResult | bytes:
        if step.attempt == 1:
            return result(step, "The answer is 17.")
        if "killed" in step.task_id:
            return result(step, "", cost_usd=0.0, error=ErrorInfo(kind="killed", message="kill switch (task)"))
        return Bus.rejection("task cap reached", "refused")

    await router_peers(settings, respond)
    await start_agent(careful, settings)

    caught = await ask(nc, settings, agent_request("careful", params={"catch": True}))
    [note] = caught.artifacts  # what the handler returned, not all it stored
    assert caught.error is None
    assert (await artifact(nc, settings, note.id, TENANT)).body["text"] == "kept the draft: refused: task cap reached"
    assert len(caught.calls) == 1  # the rejected call never reached a model

    uncaught = await ask(nc, settings, agent_request("careful", task_id="t-killed"))
    assert uncaught.error == ErrorInfo(kind="killed", message="kill switch (task)")
    [draft] = uncaught.artifacts  # what it stored before the refusal
    assert (await artifact(nc, settings, draft.id, TENANT)).body["text"] == "The answer is 17."
    assert len(uncaught.calls) == 2  # the killed call was answered, so it counts

    crashed = await ask(nc, settings, agent_request("careful", params={"crash": True}))
    assert crashed.error is not None and crashed.error.kind == "agent" and crashed.error.retryable
    assert "RuntimeError" in crashed.error.message and crashed.artifacts == [draft]

    assert (await ask(nc, settings, agent_request("careful", params={"catch": True}))).error is None


@pytest.mark.infra
async def test_no_router_is_unavailable_and_a_passed_deadline_is_a_timeout(settings, nc, start_agent):
    await start_agent(echo, settings)

    nobody = await ask(nc, settings, agent_request("echo"))
    assert nobody.error == ErrorInfo(kind="unavailable", message="no router is answering step requests", retryable=True)
    assert nobody.calls == [] and nobody.artifacts == []

    late = await ask(nc, settings, agent_request("echo", deadline_ms=now_ms() - 1))
    assert late.error is not None and late.error.kind == "timeout"


@pytest.mark.infra
async def test_garbage_is_dead_lettered_with_the_reason_and_answered_with_a_rejection(
    settings, nc, start_agent, router_peers
):
    await router_peers(settings, lambda step: result(step, "17"))
    await start_agent(sleepy, settings)
    subject = settings.subjects.agent("sleepy")

    for payload in (GARBAGE, SCHEMA_INVALID):
        reply = await nc.request(subject, payload, timeout=5)
        rejection = msgspec.json.decode(reply.data, type=Rejection)
        assert rejection.error.kind == "invalid" and rejection.error.message.startswith("AgentRequest: ")

    letters = [msgspec.json.decode(d, type=DeadLetter) for d in await stream_messages(nc, settings, STREAM_DLQ)]
    assert [(d.service, d.subject, d.data) for d in letters] == [
        ("agent-sleepy", subject, GARBAGE),
        ("agent-sleepy", subject, SCHEMA_INVALID),
    ]
    assert all(d.error.startswith("AgentRequest: ") for d in letters)
    assert (await ask(nc, settings, agent_request("sleepy"))).error is None  # and it keeps serving


@pytest.mark.infra
async def test_an_instance_runs_its_requests_at_once_up_to_max_concurrency(settings, nc, start_agent):
    await start_agent(sleepy, settings)
    running["most"] = 0
    started = time.monotonic()

    replies = await asyncio.gather(*(ask(nc, settings, agent_request("sleepy")) for _ in range(9)))

    assert all(r.error is None for r in replies)
    assert running["most"] == 3  # sleepy's max_concurrency
    assert time.monotonic() - started < 2.5  # three waves of 0.3 s, not nine


@pytest.mark.infra
async def test_two_instances_share_the_requests(settings, nc, bus, start_agent):
    await start_agent(sleepy, settings)
    await start_agent(sleepy, settings)

    await asyncio.gather(*(ask(nc, settings, agent_request("sleepy")) for _ in range(24)))

    instances = await agent_instances(bus, "sleepy")
    assert len(instances) == 2
    assert sum(i.stats.served for i in instances) == 24
    assert all(i.stats.served > 0 for i in instances)  # the queue group spread them (all on one: p = 2^-23)


@pytest.mark.infra
async def test_a_stopping_instance_finishes_the_requests_it_holds_and_takes_no_more(settings, nc, start_agent):
    app = await start_agent(sleepy, settings)
    held = asyncio.create_task(ask(nc, settings, agent_request("sleepy")))
    await eventually(lambda: running["now"] == 1)

    await app.stop()

    assert (await held).error is None
    with pytest.raises(nats.errors.NoRespondersError):
        await ask(nc, settings, agent_request("sleepy"))


# -- the shipped debate agent --

DEBATER = re.compile(r"debater (\d+) of")
# What each debater answers in each round: round 1 splits 18 / 17 / 17, round 2 keeps 17 the majority.
DEBATE = {1: {1: "I get 18.", 2: "It is 17", 3: "17 cows."}, 2: {1: "I now agree: 17", 2: "Still 17.", 3: "18"}}


def debater(step: StepRequest) -> tuple[int, int]:
    """(debater, round) of a debate call, read from its messages."""
    match = DEBATER.search(step.messages[0].content)
    assert match is not None
    return int(match.group(1)), 1 if len(step.messages) == 2 else 2


def debating(step: StepRequest) -> InferenceResult:
    number, round_number = debater(step)
    return result(step, DEBATE[round_number][number])


@pytest.mark.unit
def test_the_majority_compares_final_answers_and_ties_go_to_the_first_debater():
    texts = ["so 1,800.0 cows", "It is 1800", "Blue", "blue "]
    answers = {d: InferenceResult(call_id=str(d), model="m", tier="local", output=t) for d, t in enumerate(texts, 1)}
    assert debate.final_answer("3 plus 4 is 7.") == "7" and debate.final_answer(" Blue ") == "Blue"
    assert debate.majority(answers).output == "so 1,800.0 cows"
    tie = {1: answers[3], 2: answers[2], 3: answers[1]}  # Blue, 1800, 1800: a majority, not the first
    assert debate.majority(tie).output == "It is 1800"
    assert debate.majority({1: answers[3], 2: answers[2]}).output == "Blue"


@pytest.mark.infra
async def test_debate_makes_k_times_rounds_calls_k_at_once_and_keeps_the_majority(
    settings, nc, start_service, start_agent, router_peers
):
    await start_service("artifact-store", settings)
    peer = await router_peers(settings, debating, delay_s=0.3)
    await start_agent(debate.agent, settings)
    message = agent_request("debate", params={"k": 3, "rounds": 2})

    reply = await ask(nc, settings, message)

    assert reply.error is None and len(reply.calls) == 6 and reply.cost_usd == pytest.approx(0.006)
    assert len(peer.requests) == 6 and peer.max_in_flight == 3  # a round's calls at once, rounds in turn
    assert all(s.messages[1] == ChatMessage(role="user", content=SHORT) for s in peer.requests)
    assert len({s.messages[0].content for s in peer.requests}) == 3  # one persona each: no identical calls
    seen = {debater(s): s.messages[-1].content for s in peer.requests if debater(s)[1] == 2}
    assert "Debater 2: It is 17" in seen[(1, 2)] and "Debater 3: 17 cows." in seen[(1, 2)]
    assert "Your previous answer: I get 18." in seen[(1, 2)] and "Debater 1: I get 18." in seen[(2, 2)]
    [ref] = reply.artifacts
    answer = await artifact(nc, settings, ref.id, TENANT)
    assert answer.body["text"] == "I now agree: 17" and answer.calls == reply.calls


@pytest.mark.infra
async def test_a_refused_debate_stores_the_last_rounds_majority_and_says_why(
    settings, nc, start_service, start_agent, router_peers
):
    await start_service("artifact-store", settings)

    def refuse_round_two(step: StepRequest) -> InferenceResult | bytes:
        number, round_number = debater(step)
        if round_number == 2 and number == 2:
            return Bus.rejection("task cap reached", "refused")
        return debating(step)

    await router_peers(settings, refuse_round_two)
    await start_agent(debate.agent, settings)

    reply = await ask(nc, settings, agent_request("debate"))

    assert reply.error is not None and reply.error.kind == "refused"
    [best] = reply.artifacts
    assert (await artifact(nc, settings, best.id, TENANT)).body["text"] == "It is 17"  # round 1's majority
    assert len(reply.calls) == 5

    invalid = await ask(nc, settings, agent_request("debate", params={"k": 12}))
    assert invalid.error is not None and (invalid.error.kind, invalid.error.retryable) == ("invalid", False)
    assert "params.k" in invalid.error.message and invalid.calls == []


@pytest.mark.infra
async def test_the_debate_workflow_runs_the_debate_agent_through_the_planner(
    settings, nc, planner_mesh, start_agent, router_peers
):
    used = await planner_mesh()  # the shipped deploy/: deploy/workflows/debate.toml
    await router_peers(used, debating)
    await start_agent(debate.agent, used)
    task = new_task(workflow="debate", goal=SHORT, tenant=TENANT, budget_usd=1.0, deadline_s=30)

    events = await submit(nc, used, task)

    assert [e.kind for e in events] == ["accepted", "planned", "step_started", "step_done", "done"]
    assert events[2].agent == "debate" and events[-1].calls == 6 and events[-1].cost_usd == pytest.approx(0.006)
    answer = await artifact(nc, used, events[-1].artifact.id, TENANT)
    assert (answer.type, answer.step_id, answer.body["text"]) == ("answer", "debate", "I now agree: 17")


@pytest.mark.infra
async def test_a_debate_whose_calls_are_refused_ends_the_task_partial_with_the_best_answer(
    settings, nc, planner_mesh, start_agent, router_peers
):
    used = await planner_mesh()

    def cap_after_round_one(step: StepRequest) -> InferenceResult | bytes:
        if debater(step)[1] == 2:
            return Bus.rejection("task cap reached", "refused")
        return debating(step)

    await router_peers(used, cap_after_round_one)
    await start_agent(debate.agent, used)

    events = await submit(nc, used, new_task(workflow="debate", goal=SHORT, budget_usd=1.0, deadline_s=30))

    assert [e.kind for e in events][-2:] == ["refused", "partial"]
    assert (await artifact(nc, used, events[-1].artifact.id)).body["text"] == "It is 17"


# -- the shipped fixer agent --


@pytest.mark.infra
async def test_fixer_feeds_the_failure_back_until_a_candidate_passes(
    settings, nc, start_service, start_agent, router_peers
):
    await start_service("artifact-store", settings)
    peer = await router_peers(settings, lambda s: result(s, "So 18 cows." if len(s.messages) > 2 else "So 16 cows."))
    await start_agent(fixer.agent, settings)

    reply = await ask(nc, settings, agent_request("fixer", params={"expected": 17 + 1}))

    assert reply.error is None and len(reply.calls) == 2
    retry = peer.requests[1].messages
    assert retry[1].content == SHORT and retry[2] == ChatMessage(role="assistant", content="So 16 cows.")
    assert "failed the check" in retry[3].content and "'16'" in retry[3].content
    assert (await artifact(nc, settings, reply.artifacts[0].id, TENANT)).body["text"] == "So 18 cows."

    stuck = await ask(nc, settings, agent_request("fixer", params={"must_contain": "sheep", "max_turns": 3}))
    assert stuck.error is not None and (stuck.error.kind, stuck.error.retryable) == ("agent", False)
    assert len(stuck.calls) == 3 and len(stuck.artifacts) == 1  # its last candidate, kept for a partial end


# -- a runaway agent, stopped by the mesh (the real router, inference service and accountant) --

FRONTIER = "gpt-4-1106-preview"
NEVER = {"must_contain": "a word no model writes", "max_turns": 1_000}


class NewReplyEachCall(Behaviour):
    """A model that never repeats itself: every answer is new, so no two of the fixer's calls are identical."""

    answers = itertools.count(1)

    @property  # type: ignore[override]
    def reply(self) -> str:
        return f"Attempt {next(self.answers)}: 16 cows."

    @reply.setter
    def reply(self, _: str) -> None:  # Behaviour's __init__ sets its default
        pass


async def runaway_mesh(settings, start_service, start_agent) -> None:
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0)
    await start_service("artifact-store", settings)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)  # deploy/planner.toml's layer 2: identical_calls 2, 100 agent calls
    await start_agent(fixer.agent, settings)


async def task_usage(nc, settings, task_id: str, count: int) -> list[UsageEvent]:
    """The task's usage rows, once ``count`` of them are stored."""

    async def stored() -> list[UsageEvent]:
        events = [e for e in await usage_events(nc, settings) if e.task_id == task_id]
        return events if len(events) >= count else []

    return await eventually(stored, message=f"fewer than {count} usage rows for task {task_id}")


@pytest.mark.infra
async def test_a_runaway_agent_repeating_itself_is_stopped_by_layer_2_with_a_bounded_bill(
    settings, nc, start_service, start_agent, data_dir
):
    await runaway_mesh(settings, start_service, start_agent)
    # The replay backend answers a recorded prompt the same way every time: the fixer's second call repeats.
    goal = next(r.prompt for r in load_recorded_outcomes(data_dir) if r.dataset == "gsm8k")
    message = agent_request("fixer", goal=goal, params=NEVER, task_budget_usd=5.0, allow_models=[FRONTIER])

    reply = await ask(nc, settings, message, timeout_s=30)

    assert reply.error is not None and (reply.error.kind, reply.error.retryable) == ("refused", False)
    assert reply.error.message.startswith("layer 2 (anti-loop):") and "identical_calls" in reply.error.message
    # Turn 1, turn 2 (a new prompt: the candidate and why it failed), turn 3 (the same again: the cache),
    # turn 4 (a third time: refused). Two paid calls in all, and the last candidate kept for a partial end.
    events = await task_usage(nc, settings, message.task_id, 4)
    assert [(e.outcome, e.agent) for e in events] == [("ok", "fixer"), ("ok", "fixer"), ("cache_hit", "fixer"),
                                                      ("refused", "fixer")]  # fmt: skip
    assert sorted(reply.calls) == sorted(e.event_id for e in events)
    assert reply.cost_usd == pytest.approx(sum(e.cost_usd for e in events)) and 0 < reply.cost_usd < 0.05
    [best] = reply.artifacts
    assert (await artifact(nc, settings, best.id, TENANT)).calls == reply.calls


@pytest.mark.infra
async def test_a_runaway_agent_that_never_repeats_itself_is_stopped_by_the_task_budget(
    openai_settings, nc, start_service, start_agent, fake_openai
):
    settings = openai_settings
    fake_openai.behaviour = NewReplyEachCall(api_key="sk-test")
    await runaway_mesh(settings, start_service, start_agent)
    cap = 0.02  # a few of GPT-4's worst cases (512 output tokens at $30 per million: $0.0154 each)
    message = agent_request("fixer", params=NEVER, task_budget_usd=cap, allow_models=[FRONTIER])

    reply = await ask(nc, settings, message, timeout_s=30)

    assert reply.error is not None and reply.error.kind == "refused", reply.error
    assert "budget" in reply.error.message and "would be exceeded" in reply.error.message, reply.error.message
    paid = len(fake_openai.requests)
    assert 2 <= paid < 100  # stopped by the cap, well before layer 2's 100 agent calls
    events = await task_usage(nc, settings, message.task_id, paid + 1)
    assert [e.outcome for e in events] == ["ok"] * paid + ["refused"]
    assert sum(e.cost_usd for e in events) == pytest.approx(reply.cost_usd) and reply.cost_usd <= cap
    assert len(reply.artifacts) == 1  # its last candidate
