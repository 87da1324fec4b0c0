"""The production OpenAI-compatible client and the ``openai`` backend against a loopback fake of the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from fakes.openai_server import Behaviour, FakeOpenAI
from helpers import eventually

from schemas.messages import ChatMessage, ChatOptions, FunctionCall, FunctionSpec, InferenceRequest, Tool, ToolCall
from services.inference.backend import BackendError, OnDelta, OutputDelta
from services.inference.openai_backend import OpenAIBackend
from services.inference.openai_client import OpenAIClient, OpenAIError, sse_data
from services.runtime.catalog import Catalog
from services.runtime.settings import REPO_DEPLOY_DIR
from services.runtime.tokens import count_message_tokens

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is six times seven?"}]


@pytest.fixture
async def client(fake_openai) -> AsyncIterator[OpenAIClient]:
    client = OpenAIClient(fake_openai.url, "sk-test")
    yield client
    await client.aclose()


async def test_streams_text_usage_cached_tokens_and_provider_model(fake_openai, client):
    fake_openai.behaviour = Behaviour(
        reply="Six times seven is 42.", model="gpt-4-1106-preview-2023", cached_tokens=3, api_key="sk-test"
    )

    reply = await client.chat("gpt-4-1106-preview", MESSAGES, max_tokens=64)

    assert reply.text == "Six times seven is 42."
    assert reply.finish_reason == "stop"
    assert reply.model == "gpt-4-1106-preview-2023"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.cached_tokens) == (7, 5, 3)
    seen = fake_openai.requests[0]
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}
    assert (seen.body["model"], seen.body["max_tokens"], seen.body["messages"]) == ("gpt-4-1106-preview", 64, MESSAGES)


async def test_max_tokens_cuts_the_reply_with_finish_reason_length(fake_openai, client):
    fake_openai.behaviour = Behaviour(reply="one two three four five")

    reply = await client.chat("m", MESSAGES, max_tokens=2)

    assert (reply.text, reply.finish_reason, reply.usage.completion_tokens) == ("one two", "length", 2)


async def test_stream_without_usage_reports_none(fake_openai, client):
    fake_openai.behaviour = Behaviour(usage=False)

    reply = await client.chat("m", MESSAGES, max_tokens=64)

    assert reply.text == "The answer is 42."
    assert reply.usage is None


async def test_a_server_that_ignores_stream_is_read_as_one_json_body(fake_openai, client):
    fake_openai.behaviour = Behaviour(stream=False, model="served-model", cached_tokens=2)

    reply = await client.chat("m", MESSAGES, max_tokens=64)

    assert (reply.text, reply.finish_reason, reply.model) == ("The answer is 42.", "stop", "served-model")
    assert (reply.usage.completion_tokens, reply.usage.cached_tokens) == (4, 2)


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (503, True), (400, False), (401, False)])
async def test_http_errors_map_to_retryable_or_not(fake_openai, client, status, retryable):
    fake_openai.behaviour = Behaviour(status=status)

    with pytest.raises(OpenAIError) as caught:
        await client.chat("m", MESSAGES, max_tokens=8)

    assert (caught.value.status, caught.value.retryable, caught.value.started) == (status, retryable, False)
    assert f"fake status {status}" in str(caught.value)


async def test_a_refused_connection_is_retryable_and_unbilled():
    with FakeOpenAI() as server:
        url = server.url
    client = OpenAIClient(url)
    with pytest.raises(OpenAIError) as caught:
        await client.chat("m", MESSAGES, max_tokens=8)
    await client.aclose()

    assert (caught.value.retryable, caught.value.started) == (True, False)


async def test_cancelling_a_call_closes_the_stream(fake_openai, client):
    fake_openai.behaviour = Behaviour(reply="word " * 200, token_delay_s=0.02)

    call = asyncio.create_task(client.chat("m", MESSAGES, max_tokens=500))
    await eventually(lambda: fake_openai.requests, interval_s=0.01)  # the server is streaming (about 4 s)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert await asyncio.to_thread(fake_openai.disconnects.wait, 5), "the server never saw the client go away"


async def test_sse_parser_joins_data_lines_and_skips_comments_and_other_fields():
    async def lines():
        for line in [": keep-alive", "", "event: message", 'data: {"a":', "data: 1}", "", "id: 7", "data: [DONE]"]:
            yield line

    assert [d async for d in sse_data(lines())] == ['{"a":\n1}', "[DONE]"]


def request(max_tokens: int = 64, schema: dict | None = None) -> InferenceRequest:
    return InferenceRequest(
        call_id="c1",
        task_id="t1",
        step_id="s1",
        model="gpt-4-1106-preview",
        tier="frontier",
        messages=[ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES],
        max_tokens=max_tokens,
        response_schema=schema,
        deadline_ms=0,
    )


async def test_backend_meters_provider_usage(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    fake_openai.behaviour = Behaviour(cached_tokens=4, prompt_tokens=10)
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))

    completion = await backend.complete(model, request())
    await backend.aclose()

    assert completion.usage_source == "provider"
    assert (completion.usage.input_tokens, completion.usage.cached_input_tokens, completion.usage.output_tokens) == (
        10,
        4,
        4,
    )
    assert completion.provider_model == "gpt-4-1106-preview"


async def test_backend_records_a_stream_without_usage_as_estimated_worst_case(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    fake_openai.behaviour = Behaviour(usage=False)
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))

    completion = await backend.complete(model, request(max_tokens=300))
    await backend.aclose()

    assert completion.output == "The answer is 42."
    assert completion.usage_source == "estimated"
    assert completion.usage.output_tokens == 300
    assert completion.usage.input_tokens == count_message_tokens("cl100k", request().messages) > 0


async def test_backend_sends_the_response_schema_as_json_schema_format(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    schema = {"title": "final answer", "type": "object", "properties": {"answer": {"type": "string"}}}
    fake_openai.behaviour = Behaviour()  # any key
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))

    await backend.complete(model, request(schema=schema))
    await backend.aclose()

    assert fake_openai.requests[0].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "final_answer", "schema": schema},
    }


async def test_backend_maps_a_rate_limit_to_a_retryable_provider_error(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    fake_openai.behaviour = Behaviour(status=429)
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))

    with pytest.raises(BackendError) as caught:
        await backend.complete(model, request())
    await backend.aclose()

    assert (caught.value.kind, caught.value.retryable, caught.value.started) == ("provider", True, False)


# -- options, tools and streamed pieces --

TOOLS = [
    Tool(function=FunctionSpec(name="get_weather", parameters={"type": "object", "properties": {}})),
    Tool(function=FunctionSpec(name="get_time")),
]


def collector() -> tuple[list[OutputDelta], OnDelta]:
    """A list and the on_delta callback that appends every piece to it."""
    seen: list[OutputDelta] = []

    async def on_delta(delta: OutputDelta) -> None:
        seen.append(delta)

    return seen, on_delta


async def test_every_streamed_text_piece_reaches_on_delta_in_order(fake_openai, client):
    fake_openai.behaviour = Behaviour(reply="one two three four", api_key="sk-test")
    seen, on_delta = collector()

    reply = await client.chat("m", MESSAGES, max_tokens=64, on_delta=on_delta)

    assert [d.content for d in seen] == ["one", " two", " three", " four"]
    assert "".join(d.content for d in seen) == reply.text and reply.tool_calls == ()
    assert {d.provider_model for d in seen} == {"m"} and all(d.tool_calls is None for d in seen)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "one-body"])
async def test_tool_calls_are_assembled_by_index(fake_openai, client, stream):
    fake_openai.behaviour = Behaviour(tool_calls=2, tool_arguments='{"city": "Oslo"}', stream=stream)
    seen, on_delta = collector()
    tools = msgspec.to_builtins(TOOLS)

    reply = await client.chat("m", MESSAGES, max_tokens=64, extra={"tools": tools}, on_delta=on_delta)

    assert reply.finish_reason == "tool_calls" and reply.text == ""
    assert reply.tool_calls == (
        ToolCall(id="call_fake_0", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}')),
        ToolCall(id="call_fake_1", function=FunctionCall(name="get_time", arguments='{"city": "Oslo"}')),
    )
    if stream:  # the pieces as streamed: the first of each call names it, the rest add arguments
        pieces = [p for d in seen for p in d.tool_calls]
        firsts = [(p.index, p.id, p.name) for p in pieces[:2]]
        assert firsts == [(0, "call_fake_0", "get_weather"), (1, "call_fake_1", "get_time")]
        assert "".join(p.arguments for p in pieces if p.index == 1) == '{"city": "Oslo"}'
        assert reply.ttft_s > 0
    else:
        assert seen == []


def options_request(messages: list[ChatMessage], **options) -> InferenceRequest:
    return msgspec.structs.replace(request(), messages=messages, options=ChatOptions(**options))


async def test_backend_sends_every_option_and_the_tool_fields_of_messages(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    fake_openai.behaviour = Behaviour()
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments="{}"))
    messages = [
        ChatMessage(role="developer", content="Be brief."),
        ChatMessage(role="user", content="Weather?", name="ann"),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    ]
    options = {"temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["END"], "user": "u-1"}

    completion = await backend.complete(
        model, options_request(messages, tools=TOOLS, tool_choice="auto", json_object=True, **options)
    )
    await backend.aclose()

    body = fake_openai.requests[0].body
    assert {k: body[k] for k in options} == options
    assert (body["tools"], body["tool_choice"]) == (msgspec.to_builtins(TOOLS), "auto")
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"] == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [msgspec.to_builtins(call)]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    # After a tool message the model answers text: the json_object reply, cut at nothing.
    assert (completion.output, completion.tool_calls) == ('{"answer": 42}', None)


async def test_backend_defaults_send_temperature_zero_and_no_other_option(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    fake_openai.behaviour = Behaviour()
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))

    await backend.complete(model, request())
    await backend.aclose()

    body = fake_openai.requests[0].body
    assert body["temperature"] == 0
    assert not {"top_p", "seed", "stop", "tools", "tool_choice", "user", "response_format"} & set(body)


async def test_backend_returns_tool_calls_and_cuts_text_at_a_stop_sequence(fake_openai):
    model = Catalog.load(REPO_DEPLOY_DIR).model("gpt-4-1106-preview")
    fake_openai.behaviour = Behaviour(reply="first part END second part")
    backend = OpenAIBackend(OpenAIClient(fake_openai.url))
    seen, on_delta = collector()

    called = await backend.complete(model, options_request(request().messages, tools=TOOLS), on_delta)
    stopped = await backend.complete(model, options_request(request().messages, stop=["END"]))
    await backend.aclose()

    assert called.finish_reason == "tool_calls" and called.output == ""
    assert called.tool_calls == [ToolCall(id="call_fake_0", function=FunctionCall(name="get_weather", arguments="{}"))]
    assert [p.arguments for d in seen for p in d.tool_calls] == ["", "{", "}"]
    assert (stopped.output, stopped.finish_reason) == ("first part", "stop")
