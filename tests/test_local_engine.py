"""The real local tier: SmolLM2-135M on the embedded CPU engine, called directly over HTTP and
through local-inference on a real nats-server, metered into a real ClickHouse.

Assertions are on structure (token counts, finish reasons, schema validity), never on wording.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from fakes.grants import granted
from helpers import eventually, kill_switch
from mesh_client import call, engine_metrics, usage_events, usage_row, wait_engine_idle

from schemas.messages import ChatMessage, ChatOptions, FunctionSpec, InferenceRequest, InferenceResult, Tool
from services.embedded.engine.model import StopSequences
from services.inference.openai_client import OpenAIClient
from services.runtime.bus import now_ms
from services.runtime.control import set_kill

MODEL = "smollm2-135m"
LABELS = {"type": "object", "properties": {"label": {"enum": ["positive", "negative"]}}, "required": ["label"]}
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def request(*, max_tokens: int, deadline_s: float = 30.0, tenant: str = "acme", **fields) -> InferenceRequest:
    return InferenceRequest(
        call_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        step_id="classify",
        tenant=tenant,
        model=MODEL,
        tier="local",
        messages=[ChatMessage(role=m["role"], content=m["content"]) for m in fields.pop("messages", STORY)],
        max_tokens=max_tokens,
        deadline_ms=now_ms() + int(deadline_s * 1000),
        **fields,
    )


async def call_engine(nc, settings, req: InferenceRequest) -> InferenceResult:
    """A call through local-inference to the model on the engine (a long one takes a while), with the
    accountant's grant (the engine's model is priced by its hardware profile: a paid call)."""
    return await call(nc, settings.subjects.infer_local(MODEL), granted(req), timeout_s=60)


USAGE_COLUMNS = "outcome, usage_source, input_tokens, cached_input_tokens, output_tokens, cost_usd, hardware_profile"


# -- the engine itself, over HTTP --


@pytest.mark.engine
async def test_a_stream_reports_the_engines_own_usage_and_cached_prompt_tokens(local_engine):
    await wait_engine_idle(local_engine)
    client = OpenAIClient(local_engine)
    prompt = [{"role": "user", "content": "Name three colours."}]
    first = await client.chat(MODEL, prompt, max_tokens=16)
    again = await client.chat(MODEL, prompt, max_tokens=16)
    await client.aclose()

    assert first.model == MODEL and first.text and first.ttft_s > 0
    assert first.usage is not None and again.usage is not None
    assert 0 < first.usage.completion_tokens <= 16
    assert first.finish_reason == ("length" if first.usage.completion_tokens == 16 else "stop")
    # The same chat again: the same prompt count, most of it served from the KV cache.
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.cached_tokens >= first.usage.prompt_tokens - 1


@pytest.mark.engine
async def test_structured_output_follows_the_schema(local_engine):
    await wait_engine_idle(local_engine)
    client = OpenAIClient(local_engine)
    reply = await client.chat(
        MODEL,
        [{"role": "user", "content": "Is this review positive or negative? 'Terrible, it broke in a day.'"}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "sentiment", "schema": LABELS}},
    )
    await client.aclose()
    assert json.loads(reply.text)["label"] in ("positive", "negative")


@pytest.mark.engine
async def test_bad_requests_get_clear_errors(local_engine):
    async with httpx.AsyncClient() as http:
        wrong_model = await http.post(f"{local_engine}/chat/completions", json={"model": "gpt-4", "messages": []})
        garbage = await http.post(f"{local_engine}/chat/completions", content=b"{not json")
    assert wrong_model.status_code == 404 and MODEL in wrong_model.json()["error"]["message"]
    assert garbage.status_code == 400 and "not a valid chat completion request" in garbage.json()["error"]["message"]


# -- through the mesh --


@pytest.mark.infra
@pytest.mark.engine
async def test_generation_through_the_mesh_is_metered_with_the_engines_token_counts(
    engine_settings, start_service, nc, clickhouse_url
):
    await wait_engine_idle(engine_settings.local_engine_url)
    await start_service("accountant", engine_settings, database=engine_settings.subject_prefix)
    await start_service("local-inference", engine_settings)
    req = request(max_tokens=24, messages=[{"role": "user", "content": "Say hello to the mesh."}])
    result = await call_engine(nc, engine_settings, req)

    assert result.error is None and result.output and result.ttft_ms > 0
    assert result.usage.input_tokens > 0 and 0 < result.usage.output_tokens <= 24
    row = await usage_row(clickhouse_url, engine_settings.subject_prefix, req.call_id, USAGE_COLUMNS)
    assert (row["outcome"], row["usage_source"], row["hardware_profile"]) == ("ok", "provider", "cpu-2core")
    assert (row["input_tokens"], row["output_tokens"]) == (result.usage.input_tokens, result.usage.output_tokens)
    assert float(row["cost_usd"]) == pytest.approx(result.cost_usd) and result.cost_usd > 0


@pytest.mark.infra
@pytest.mark.engine
async def test_a_deadline_stops_the_generation_on_the_engine(engine_settings, start_service, nc, clickhouse_url):
    base = engine_settings.local_engine_url
    await wait_engine_idle(base)
    await start_service("accountant", engine_settings, database=engine_settings.subject_prefix)
    await start_service("local-inference", engine_settings)
    before = engine_metrics(base)["llamacpp:tokens_predicted_total"]
    req = request(max_tokens=2000, deadline_s=1.0)
    result = await call_engine(nc, engine_settings, req)

    assert result.error is not None and result.error.kind == "timeout"
    await wait_engine_idle(base)
    generated = engine_metrics(base)["llamacpp:tokens_predicted_total"] - before
    # Stopped after about a second of decoding, far short of max_tokens.
    assert 0 < generated < 1000
    row = await usage_row(clickhouse_url, engine_settings.subject_prefix, req.call_id, USAGE_COLUMNS)
    assert (row["outcome"], row["usage_source"], row["output_tokens"]) == ("timeout", "estimated", 2000)


@pytest.mark.infra
@pytest.mark.engine
async def test_a_kill_switch_cancels_the_generation_on_the_engine(engine_settings, start_service, nc, bus):
    base = engine_settings.local_engine_url
    await wait_engine_idle(base)
    await start_service("local-inference", engine_settings)
    before = engine_metrics(base)["llamacpp:tokens_predicted_total"]
    req = request(max_tokens=2000, tenant="doomed")
    running = asyncio.create_task(call_engine(nc, engine_settings, req))
    await eventually(lambda: engine_metrics(base)["llamacpp:requests_processing"] > 0, timeout_s=30)

    await set_kill(bus, kill_switch("tenant", "doomed"))
    result = await running

    assert result.error is not None and result.error.kind == "killed"
    await wait_engine_idle(base)
    assert engine_metrics(base)["llamacpp:tokens_predicted_total"] - before < 1000


# -- the options an OpenAI caller sets, and what the engine refuses --


async def engine_chat(base: str, messages: list[dict], **fields) -> httpx.Response:
    """One non-streamed chat completion on the engine, as any OpenAI client sends it."""
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(f"{base}/chat/completions", json={"model": MODEL, "messages": messages, **fields})


async def warm(base: str, messages: list[dict]) -> None:
    """Leave the prompt in the engine's KV cache, so the next calls with it read the same logits: a
    prompt evaluated whole and one evaluated on top of the cache can differ in the last float bits,
    and then in the words sampled, even greedily."""
    await wait_engine_idle(base)
    (await engine_chat(base, messages, max_tokens=2)).raise_for_status()


@pytest.mark.engine
async def test_a_stop_sequence_ends_the_output_before_it(local_engine):
    await wait_engine_idle(local_engine)
    prompt = [{"role": "user", "content": "Describe the sea in two sentences."}]

    # English has spaces and the letter e early on; where exactly is the model's business.
    word, no_e = [
        (await engine_chat(local_engine, prompt, max_tokens=40, stop=stop)).json() for stop in (" ", ["zzz", "e"])
    ]

    for reply, stop in ((word, " "), (no_e, "e")):
        text = reply["choices"][0]["message"]["content"]
        assert text and stop not in text and reply["choices"][0]["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] < 40


@pytest.mark.unit
def test_stop_sequences_hold_back_what_may_start_one():
    stops = StopSequences(("END", "\n\n"))
    fed = [stops.feed(piece) for piece in ("Hello", " E", "N", "x more", "\n", "\nafter")]
    assert fed == [("Hello", False), (" ", False), ("", False), ("ENx more", False), ("", False), ("", True)]
    open_end = StopSequences(("END",))
    assert [open_end.feed(piece) for piece in ("ab E", "N")] == [("ab ", False), ("", False)]
    assert open_end.held() == "EN"  # the output ended without the stop: what was held is output


@pytest.mark.engine
async def test_a_seed_makes_a_sampled_answer_repeatable(local_engine):
    prompt = [{"role": "user", "content": "Invent a name for a cat."}]
    await warm(local_engine, prompt)
    sampled = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}

    first, again = [(await engine_chat(local_engine, prompt, **sampled)).json() for _ in range(2)]

    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]


@pytest.mark.engine
async def test_json_object_output_is_a_json_object(local_engine):
    await wait_engine_idle(local_engine)
    prompt = [{"role": "user", "content": "Describe a red apple as a JSON object with a colour and a size."}]

    reply = (await engine_chat(local_engine, prompt, max_tokens=80, response_format={"type": "json_object"})).json()

    text = reply["choices"][0]["message"]["content"]
    assert text.lstrip().startswith("{")
    if reply["choices"][0]["finish_reason"] == "stop":  # not cut off at max_tokens
        assert isinstance(json.loads(text), dict)


@pytest.mark.engine
async def test_developer_and_tool_messages_are_read_and_tools_are_refused(local_engine):
    await wait_engine_idle(local_engine)
    conversation = [
        {"role": "developer", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "12 degrees and raining", "tool_call_id": "call_1"},
    ]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

    answered = await engine_chat(local_engine, conversation, max_tokens=16)
    refused = await engine_chat(local_engine, conversation[:2], max_tokens=16, tools=tools)

    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"]
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "tools", None)
    assert "does not run tools" in error["message"]


@pytest.mark.infra
@pytest.mark.engine
async def test_a_call_with_tools_on_the_engine_is_an_unbilled_error(engine_settings, start_service, nc, bus):
    await wait_engine_idle(engine_settings.local_engine_url)
    await start_service("local-inference", engine_settings)
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    req = request(max_tokens=8, options=ChatOptions(tools=tools))

    result = await call_engine(nc, engine_settings, req)

    assert result.error is not None and (result.error.kind, result.error.retryable) == ("provider", False)
    assert "does not run tools" in result.error.message and result.cost_usd == 0
    [event] = await usage_events(nc, engine_settings)
    assert (event.event_id, event.outcome, event.cost_usd) == (req.call_id, "error", 0)
