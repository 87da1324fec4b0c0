"""Streamed calls end to end on a real nats-server: a step with ``stream_to`` gets its output as
StreamChunks (seq from 0, in order, adding up to the result) from the fake OpenAI provider and from
the real local engine; tool calls stream and round-trip; a cancel on ``<stream_to>.cancel`` stops
the call (the provider's stream closes, the engine goes idle) and meters it once as cancelled,
counted from what was streamed; a streamed cascade streams only its escalation; and a ``stream_to``
that points into the mesh's own subjects is refused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from fakes.grants import granted
from fakes.inference_peer import InferencePeer
from helpers import SHORT, eventually, make_step, shipped_catalog
from mesh_client import ask, call, engine_metrics, usage_events, usage_rows, wait_engine_idle

from schemas.messages import (
    ChatMessage,
    ChatOptions,
    FunctionCall,
    FunctionSpec,
    InferenceRequest,
    StreamChunk,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from schemas.subjects import Subjects
from services.inference.backend import OutputDelta
from services.inference.streaming import StreamRelay, check_stream_to
from services.routing.policies import PolicySet
from services.routing.policies.cascade import CascadePolicy
from services.runtime.bus import now_ms
from services.runtime.tokens import count_message_tokens, count_tokens

FRONTIER = "gpt-4-1106-preview"
LOCAL = "mixtral-8x7b-local"
ENGINE_MODEL = "smollm2-135m"
TOOLS = [Tool(function=FunctionSpec(name="get_weather", parameters={"type": "object", "properties": {}}))]
LONG_REPLY = " ".join(f"word{i}" for i in range(300))


class Stream:
    """The caller's side of a streamed call: its inbox, the chunks that came, and its cancel."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.chunks: list[StreamChunk] = []

    async def open(self) -> Stream:
        await self.nc.subscribe(self.inbox, cb=self._on_chunk)
        await self.nc.flush()
        return self

    async def _on_chunk(self, msg) -> None:
        self.chunks.append(msgspec.json.decode(msg.data, type=StreamChunk))

    def text(self) -> str:
        return "".join(chunk.content for chunk in self.chunks)

    async def cancel(self) -> None:
        await self.nc.publish(Subjects.stream_cancel(self.inbox), b"")
        await self.nc.flush()

    async def complete(self, output: str) -> None:
        """Until the chunks add up to ``output`` (a chunk may arrive just after the result)."""
        await eventually(lambda: self.text() == output, message=lambda: f"{self.text()!r} != {output!r}")


def assert_in_order(chunks: list[StreamChunk], call_id: str) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks))) and chunks
    assert {c.call_id for c in chunks} == {call_id}


@pytest.fixture
async def provider_mesh(openai_settings, start_service, nc):
    """The router, cloud-inference on the fake OpenAI provider and a granting budget peer."""
    await BudgetPeer(nc, openai_settings.subjects).start()
    await start_service("cloud-inference", openai_settings)
    await start_service("router", openai_settings)
    await nc.flush()
    return openai_settings


# -- through the router, from the fake OpenAI provider --


@pytest.mark.infra
async def test_a_streamed_step_arrives_in_order_and_adds_up_to_the_result(provider_mesh, nc, fake_openai):
    fake_openai.behaviour.reply = "Six times seven is forty-two, as everyone knows."
    stream = await Stream(nc).open()

    result = await ask(nc, provider_mesh, make_step(role="review", stream_to=stream.inbox))

    assert result.error is None and result.model == FRONTIER
    await stream.complete(result.output)
    assert_in_order(stream.chunks, result.call_id)
    assert len(stream.chunks) == 8  # one per word of the reply


@pytest.mark.infra
async def test_a_tool_call_round_trip_through_the_router(provider_mesh, nc, fake_openai):
    fake_openai.behaviour.tool_arguments = '{"city": "Oslo"}'
    stream = await Stream(nc).open()
    asked = ChatMessage(role="user", content="What is the weather in Oslo?")
    step = make_step(role="review", options=ChatOptions(tools=TOOLS), stream_to=stream.inbox)

    called = await ask(nc, provider_mesh, msgspec.structs.replace(step, messages=[asked]))

    expected = ToolCall(id="call_fake_0", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}'))
    assert called.error is None and called.finish_reason == "tool_calls"
    assert (called.output, called.tool_calls) == ("", [expected])
    await eventually(lambda: len(stream.chunks) == 1 + len(expected.function.arguments))
    assert_in_order(stream.chunks, called.call_id)
    pieces = [piece for chunk in stream.chunks for piece in chunk.tool_calls]
    assert (pieces[0].id, pieces[0].name) == ("call_fake_0", "get_weather")
    assert "".join(piece.arguments for piece in pieces) == expected.function.arguments

    answered_with = [
        asked,
        ChatMessage(role="assistant", tool_calls=called.tool_calls),
        ChatMessage(role="tool", content="12 degrees and raining", tool_call_id="call_fake_0"),
    ]
    answered = await ask(nc, provider_mesh, msgspec.structs.replace(step, messages=answered_with, stream_to=""))

    assert answered.error is None and answered.tool_calls is None
    assert (answered.output, answered.finish_reason) == ("The answer is 42.", "stop")
    sent = fake_openai.requests[-1].body["messages"]
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": [msgspec.to_builtins(expected)]}
    assert sent[2] == {"role": "tool", "content": "12 degrees and raining", "tool_call_id": "call_fake_0"}


@pytest.mark.infra
async def test_a_cancel_closes_the_provider_stream_and_meters_what_was_streamed(
    openai_settings, start_service, nc, fake_openai
):
    fake_openai.behaviour.reply = LONG_REPLY
    fake_openai.behaviour.token_delay_s = 0.02
    await start_service("cloud-inference", openai_settings)
    stream = await Stream(nc).open()
    unsigned = InferenceRequest(
        call_id=uuid.uuid4().hex,
        task_id="task-1",
        step_id="step-1",
        tenant="acme",
        model=FRONTIER,
        tier="frontier",
        messages=[ChatMessage(role="user", content="Count to three hundred.")],
        max_tokens=400,
        deadline_ms=now_ms() + 20_000,
        stream_to=stream.inbox,
    )
    request = granted(unsigned)  # the accountant's grant, as the router would carry it

    running = asyncio.create_task(call(nc, openai_settings.subjects.infer_cloud("openai"), request))
    await eventually(lambda: len(stream.chunks) >= 3)
    await stream.cancel()
    result = await running

    assert result.error is not None and result.error.kind == "cancelled"
    assert await asyncio.to_thread(fake_openai.disconnects.wait, 5), "the provider never saw the stream closed"
    await eventually(lambda: count_tokens("cl100k", stream.text()) == result.usage.output_tokens)
    assert 3 <= result.usage.output_tokens < 300
    assert result.usage.input_tokens == count_message_tokens("cl100k", request.messages)
    [event] = await usage_events(nc, openai_settings)
    assert (event.event_id, event.outcome, event.usage_source) == (request.call_id, "cancelled", "counted")
    assert (event.input_tokens, event.output_tokens) == (result.usage.input_tokens, result.usage.output_tokens)
    assert event.cost_usd == pytest.approx(shipped_catalog().model(FRONTIER).cost(result.usage))
    assert event.cost_usd > 0


class PublishedBus:
    """Stands in for the Bus where only ``publish_core`` is used: keeps what was published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, StreamChunk]] = []

    async def publish_core(self, subject: str, data: bytes) -> None:
        self.published.append((subject, msgspec.json.decode(data, type=StreamChunk)))


@pytest.mark.unit
async def test_the_relay_numbers_chunks_counts_what_it_sent_and_withholds_another_models():
    bus = PublishedBus()
    request = InferenceRequest(
        call_id="c1",
        task_id="t1",
        step_id="s1",
        model=FRONTIER,
        tier="frontier",
        messages=[ChatMessage(role="user", content="Weather?")],
        deadline_ms=0,
        options=ChatOptions(tools=TOOLS),
        stream_to="_INBOX.a",
    )
    relay = StreamRelay(bus, request, strict_pinning=True)
    pieces = [ToolCallDelta(index=0, id="call_1", name="get_weather"), ToolCallDelta(index=0, arguments="{}")]

    await relay.relay(OutputDelta(content="Let me check.", provider_model=FRONTIER))
    await relay.relay(OutputDelta(content="withheld", provider_model="gpt-4-other"))
    await relay.relay(OutputDelta(tool_calls=pieces))

    assert [(to, c.call_id, c.seq, c.content) for to, c in bus.published] == [
        ("_INBOX.a", "c1", 0, "Let me check."),
        ("_INBOX.a", "c1", 1, ""),
    ]
    assert bus.published[1][1].tool_calls == pieces
    usage = relay.counted_usage(shipped_catalog().model(FRONTIER))
    assert usage.output_tokens == count_tokens("cl100k", "Let me check.get_weather{}")
    tools_json = msgspec.json.encode(TOOLS).decode()
    assert usage.input_tokens == count_message_tokens("cl100k", request.messages) + count_tokens("cl100k", tools_json)


# -- the cascade, and where chunks may not go --


@dataclass(frozen=True)
class FixedScore:
    """A cascade validator that scores every answer the same."""

    value: float

    def score(self, output: str) -> float:
        return self.value


@pytest.mark.infra
@pytest.mark.parametrize(("score", "streamed"), [(0.0, ["", "inbox"]), (1.0, [""])], ids=["escalated", "kept"])
async def test_a_streamed_cascade_streams_only_its_escalation(settings, start_service, nc, score, streamed):
    cascade = CascadePolicy(LOCAL, FRONTIER, FixedScore(score), threshold=0.5)
    peer = await InferencePeer(nc, settings.subjects).start()
    await BudgetPeer(nc, settings.subjects).start()
    await start_service("router", settings, policies=PolicySet(default=cascade, tenants={}, workflows={}))
    await nc.flush()
    stream = await Stream(nc).open()

    result = await ask(nc, settings, make_step(stream_to=stream.inbox))

    assert result.error is None
    assert [r.stream_to.replace(stream.inbox, "inbox") for r, _ in peer.requests] == streamed


@pytest.mark.unit
def test_stream_to_must_be_a_plain_subject_outside_the_mesh():
    subjects = Subjects("mesh")
    check_stream_to("_INBOX.abc123", subjects)
    check_stream_to("gateway.streams.7", subjects)
    for bad in ("mesh.usage.acme", "mesh", "$KV.mesh_control.kill.global", "_INBOX.*", "a..b", "a.>", "a b"):
        with pytest.raises(ValueError):
            check_stream_to(bad, subjects)


@pytest.mark.infra
async def test_a_step_streaming_into_the_mesh_is_refused_before_any_call(settings, start_service, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    await BudgetPeer(nc, settings.subjects).start()
    await start_service("router", settings)
    await nc.flush()

    replies = [
        await nc.request(settings.subjects.step_request, msgspec.json.encode(make_step(stream_to=to)), timeout=5)
        for to in (settings.subjects.usage("acme"), "$JS.API.STREAM.DELETE.X")
    ]

    assert [msgspec.json.decode(r.data)["error"]["kind"] for r in replies] == ["invalid", "invalid"]
    assert "stream_to" in msgspec.json.decode(replies[0].data)["error"]["message"]
    assert (await ask(nc, settings, make_step(SHORT))).error is None  # a later step is served
    assert len(peer.requests) == 1


# -- the real local engine --


async def engine_mesh(engine_settings, start_service, nc, *, accountant: bool) -> None:
    """local-inference on the engine and the router; reservations granted by the accountant (which
    also stores usage rows) or, without one, by a budget peer."""
    if accountant:
        await start_service("accountant", engine_settings, database=engine_settings.subject_prefix)
    else:
        await BudgetPeer(nc, engine_settings.subjects).start()
    await start_service("local-inference", engine_settings)
    await start_service("router", engine_settings)
    await nc.flush()


@pytest.mark.infra
@pytest.mark.engine
async def test_a_streamed_step_on_the_local_engine_adds_up_to_the_result(engine_settings, start_service, nc):
    await wait_engine_idle(engine_settings.local_engine_url)
    await engine_mesh(engine_settings, start_service, nc, accountant=False)
    stream = await Stream(nc).open()
    step = make_step("Name three colours.", allow_models=[ENGINE_MODEL], max_tokens=24, stream_to=stream.inbox)

    result = await ask(nc, engine_settings, step, timeout_s=60)

    assert result.error is None and result.model == ENGINE_MODEL and result.output
    await stream.complete(result.output)
    assert_in_order(stream.chunks, result.call_id)
    assert 1 < len(stream.chunks) <= result.usage.output_tokens


@pytest.mark.infra
@pytest.mark.engine
async def test_a_cancel_stops_the_generation_on_the_engine_and_is_metered_once(
    engine_settings, start_service, nc, clickhouse_url
):
    base = engine_settings.local_engine_url
    await wait_engine_idle(base)
    await engine_mesh(engine_settings, start_service, nc, accountant=True)
    before = engine_metrics(base)["llamacpp:tokens_predicted_total"]
    stream = await Stream(nc).open()
    step = make_step(
        "Write a long story about a dragon who learns to bake bread.",
        allow_models=[ENGINE_MODEL],
        max_tokens=2000,
        deadline_in_ms=120_000,
        stream_to=stream.inbox,
    )

    running = asyncio.create_task(ask(nc, engine_settings, step, timeout_s=120))
    await eventually(lambda: len(stream.chunks) >= 5, timeout_s=60)
    await stream.cancel()
    cancelled_at = time.monotonic()
    result = await running

    assert result.error is not None and result.error.kind == "cancelled"
    await wait_engine_idle(base)
    assert time.monotonic() - cancelled_at < 5, "the engine kept generating after the cancel"
    assert engine_metrics(base)["llamacpp:tokens_predicted_total"] - before < 1000
    rows = await usage_rows(
        clickhouse_url,
        engine_settings.subject_prefix,
        "task_id = %(t)s",
        {"t": step.task_id},
        columns="call_id, outcome, usage_source, input_tokens, output_tokens, cost_usd",
    )
    [row] = rows
    assert (row["call_id"], row["outcome"], row["usage_source"]) == (result.call_id, "cancelled", "counted")
    assert 0 < row["output_tokens"] < step.max_tokens and row["input_tokens"] > 0
    assert row["output_tokens"] == result.usage.output_tokens and float(row["cost_usd"]) > 0
