"""The gateway's own side of a call, against a stand-in for the router (plain nats-py): what step it
sends for an OpenAI request, how it relays StreamChunks as OpenAI chunks (content and tool-call
deltas with their index), how it fills in what the chunks did not carry, and how each mesh failure
reaches the official ``openai`` SDK as that SDK's exception type. Driven by ``openai.AsyncOpenAI``."""

from __future__ import annotations

import json
from collections.abc import Callable

import msgspec
import openai
import pytest
from fakes.router_peer import result as local_result
from helpers import eventually

from schemas.messages import (
    ErrorInfo,
    FunctionCall,
    InferenceResult,
    Rejection,
    StepRequest,
    StreamChunk,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from schemas.subjects import HEADER_BUDGET
from services.gateway.keys import KeyStore
from services.runtime.bus import now_ms

pytestmark = pytest.mark.infra

MODEL = "gpt-4-1106-preview"
HI = [{"role": "user", "content": "Hi"}]
# What the stand-in does for a step: the chunks to publish on its stream_to, then the reply.
# None: no reply at all (a call still running).
Script = Callable[[StepRequest], tuple[list[StreamChunk], InferenceResult | bytes | None]]


class StreamingRouter:
    """Answers ``step_request`` as the router would, publishing chunks to ``stream_to`` first."""

    def __init__(self, nc, subject: str, script: Script, listen: bool = True) -> None:
        self.nc, self.subject, self.script = nc, subject, script
        # False: it never listens for a cancel (a call still at the router, before inference took it).
        self.listen = listen
        self.steps: list[StepRequest] = []
        self.headers: list[dict[str, str]] = []
        self.cancels: list[str] = []

    async def start(self) -> StreamingRouter:
        await self.nc.subscribe(self.subject, cb=self._on_step)
        await self.nc.flush()
        return self

    async def _on_step(self, msg) -> None:
        step = msgspec.json.decode(msg.data, type=StepRequest)
        self.steps.append(step)
        self.headers.append(dict(msg.headers or {}))
        chunks, reply = self.script(step)
        if step.stream_to and self.listen:
            await self.nc.subscribe(f"{step.stream_to}.cancel", cb=self._on_cancel)
            for chunk in chunks:
                await self.nc.publish(step.stream_to, msgspec.json.encode(chunk))
        await self.nc.flush()
        if reply is not None:
            await msg.respond(reply if isinstance(reply, bytes) else msgspec.json.encode(reply))

    async def _on_cancel(self, msg) -> None:
        self.cancels.append(msg.subject)


def answer(step: StepRequest, output: str = "", **fields) -> InferenceResult:
    return local_result(step, output, cost_usd=0.0025, usage=Usage(input_tokens=11, output_tokens=7), **fields)


@pytest.fixture
async def gateway(settings, start_service, bus, nc):
    """``await gateway(script)``: the stand-in router and a gateway; returns (client, router)."""

    async def start(script: Script, listen: bool = True) -> tuple[openai.AsyncOpenAI, StreamingRouter]:
        router = await StreamingRouter(nc, settings.subjects.step_request, script, listen).start()
        secret, _ = await (await KeyStore.open(bus)).create("acme", name="stream-tests")
        urls: list[str] = []
        await start_service("gateway", settings, port=0, listening=urls.append)
        return openai.AsyncOpenAI(base_url=urls[0] + "/v1", api_key=secret, max_retries=0), router

    return start


def pieces(call_id: str, *contents: str) -> list[StreamChunk]:
    return [StreamChunk(call_id=call_id, seq=i, content=c) for i, c in enumerate(contents)]


async def test_the_step_carries_the_keys_tenant_the_options_and_the_task_headers(gateway):
    client, router = await gateway(lambda step: ([], answer(step, "ok")))
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]

    await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        temperature=0.3,
        top_p=0.9,
        seed=7,
        stop="END",
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "f"}},
        response_format={"type": "json_object"},
        max_completion_tokens=99,
        user="end-user-1",
        metadata={"run": "1"},
        extra_headers={
            "X-Frugalmesh-Task": "run-9",
            "X-Frugalmesh-Task-Budget": "0.5",
            "X-Frugalmesh-Workflow": "coder",
            "X-Frugalmesh-Deadline": "12",
        },
    )

    [step], [headers] = router.steps, router.headers
    assert (step.tenant, step.task_id, step.workflow, step.role) == ("acme", "run-9", "coder", "chat")
    assert step.key_id.startswith("fmk_") and step.allow_models == [MODEL] and step.max_tokens == 99
    assert [(m.role, m.content) for m in step.messages] == [("developer", "Be brief."), ("user", "Hi")]
    options = step.options
    assert (options.temperature, options.top_p, options.seed, options.stop) == (0.3, 0.9, 7, ["END"])
    assert options.tools is not None and msgspec.to_builtins(options.tools) == tools
    assert options.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert (options.json_object, options.user) == (True, "end-user-1")
    assert headers[HEADER_BUDGET] == "0.5"
    assert 11_000 < step.deadline_ms - now_ms() <= 12_000
    assert step.policy == ""  # a pinned model: no policy is left to choose
    # An inbox nobody reads, so that a client that leaves can cancel the call (gateway/disconnect.py).
    assert step.stream_to.startswith("_INBOX.")


async def test_content_chunks_are_relayed_and_the_result_fills_in_what_they_missed(gateway):
    # seq 2 never arrives: the relay stops there and the result supplies the rest.
    def script(step: StepRequest):
        result = answer(step, "Hello there, world!")
        chunks = pieces(result.call_id, "Hello", " there")
        return [*chunks, StreamChunk(call_id=result.call_id, seq=3, content=" world!")], result

    client, router = await gateway(script)
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    chunks = [c async for c in stream]

    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["Hello", " there", ", world!"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].model_extra["frugalmesh"]["cost_usd"] == 0.0025
    assert router.steps[0].stream_to.startswith("_INBOX.")


async def test_a_result_without_chunks_is_streamed_whole_with_the_usage_chunk_asked_for(gateway):
    client, _ = await gateway(lambda step: ([], answer(step, "cached answer", cache_hit=True)))
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in raw.parse()]

    assert raw.headers["x-frugalmesh-cache"] == "hit"  # the result came first: every header is known
    assert [c.choices[0].delta.content for c in chunks[:1]] == ["cached answer"]
    assert [c.choices[0].finish_reason for c in chunks[1:2]] == ["stop"]
    assert chunks[2].choices == [] and chunks[2].usage.total_tokens == 18 and len(chunks) == 3


async def test_tool_calls_stream_as_indexed_deltas_and_come_back_whole(gateway):
    calls = [
        ToolCall(id="call_a", function=FunctionCall(name="weather", arguments='{"city": "Oslo"}')),
        ToolCall(id="call_b", function=FunctionCall(name="time", arguments='{"tz": "CET"}')),
    ]

    def script(step: StepRequest):
        result = answer(step, tool_calls=calls, finish_reason="tool_calls")
        deltas = [
            [ToolCallDelta(index=0, id="call_a", name="weather", arguments='{"city"')],
            [ToolCallDelta(index=0, arguments=': "Oslo"}')],
            [ToolCallDelta(index=1, id="call_b", name="time", arguments='{"tz": ')],
        ]  # the last piece of call_b never comes as a chunk: the result completes it
        return [StreamChunk(call_id=result.call_id, seq=i, tool_calls=d) for i, d in enumerate(deltas)], result

    client, _ = await gateway(script)
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("weather", "time")
    ]
    whole = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], tools=tools)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "?"}], tools=tools, stream=True
    )
    chunks = [c async for c in stream]

    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("call_a", "weather", {"city": "Oslo"}),
        ("call_b", "time", {"tz": "CET"}),
    ]
    assembled: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = assembled.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function.name or "") if delta.function else ""
            entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert assembled == {
        0: {"id": "call_a", "name": "weather", "arguments": '{"city": "Oslo"}'},
        1: {"id": "call_b", "name": "time", "arguments": '{"tz": "CET"}'},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("reply", "error_type", "status"),
    [
        (ErrorInfo(kind="refused", message="tenant acme day cap ($5) would be exceeded"), openai.RateLimitError, 429),
        (ErrorInfo(kind="killed", message="kill switch tripped (global *): stop"), openai.PermissionDeniedError, 403),
        (ErrorInfo(kind="refused", message="kill switch tripped (key k): x"), openai.PermissionDeniedError, 403),
        (ErrorInfo(kind="timeout", message="cancelled at the deadline"), openai.InternalServerError, 504),
        (ErrorInfo(kind="provider", message="upstream 500"), openai.InternalServerError, 502),
        (
            ErrorInfo(kind="refused", message="budget service unavailable", retryable=True),
            openai.InternalServerError,
            503,
        ),
        (Rejection(error=ErrorInfo(kind="invalid", message="bad step")), openai.BadRequestError, 400),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_each_mesh_failure_is_the_sdks_own_exception(gateway, reply, error_type, status, stream):
    def script(step: StepRequest):
        if isinstance(reply, Rejection):
            return [], msgspec.json.encode(reply)
        return [], InferenceResult(call_id="c1", model=MODEL, tier="frontier", error=reply)

    client, _ = await gateway(script)
    with pytest.raises(error_type) as failed:
        await client.chat.completions.create(model=MODEL, messages=HI, stream=stream)
    error = reply.error if isinstance(reply, Rejection) else reply
    assert failed.value.status_code == status and error.message in failed.value.message
    assert failed.value.response.headers["x-should-retry"] == ("true" if status == 503 else "false")


async def test_a_failure_after_the_first_chunk_is_an_error_event_the_sdk_raises(gateway):
    def script(step: StepRequest):
        failed = InferenceResult(
            call_id="c2", model=MODEL, tier="frontier", error=ErrorInfo(kind="killed", message="kill switch tripped")
        )
        return pieces("c2", "partial"), failed

    client, _ = await gateway(script)
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="kill switch tripped"):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["partial"]


async def test_a_client_that_goes_away_mid_stream_cancels_the_call(gateway):
    client, router = await gateway(lambda step: (pieces("c3", "one", " two"), None))  # no result: still running
    stream = await client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    await stream.close()

    await eventually(lambda: router.cancels, timeout_s=3)
    assert router.cancels == [f"{router.steps[0].stream_to}.cancel"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_before_any_output_cancels_the_call(gateway, stream):
    client, router = await gateway(lambda step: ([], None))  # no chunk, no result: the call runs on

    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.5).chat.completions.create(model=MODEL, messages=HI, stream=stream)

    await eventually(lambda: router.cancels, timeout_s=3)
    assert router.cancels == [f"{router.steps[0].stream_to}.cancel"]


async def test_a_cancel_sent_before_the_call_listened_is_sent_again_at_its_first_chunk(gateway, nc):
    """The client leaves while the step is still at the router (nobody hears the first cancel); the
    call then starts, and its first chunk gets the cancel again."""
    client, router = await gateway(lambda step: ([], None), listen=False)

    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.5).chat.completions.create(model=MODEL, messages=HI)
    [step] = router.steps
    heard: list[str] = []

    async def on_cancel(msg) -> None:
        heard.append(msg.subject)

    await nc.subscribe(f"{step.stream_to}.cancel", cb=on_cancel)
    await nc.publish(step.stream_to, msgspec.json.encode(StreamChunk(call_id="late", seq=0, content="x")))

    await eventually(lambda: heard, timeout_s=3)
    assert heard == [f"{step.stream_to}.cancel"]
