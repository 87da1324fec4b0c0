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
from helpers import eventually, kill_switch
from mesh_client import call, engine_metrics, usage_row, wait_engine_idle

from schemas.messages import ChatMessage, InferenceRequest, InferenceResult
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
    """A call through local-inference to the model on the engine (a long one takes a while)."""
    return await call(nc, settings.subjects.infer_local(MODEL), req, timeout_s=60)


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
