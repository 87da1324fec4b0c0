"""local-inference and cloud-inference as live services on a real nats-server: replay answers,
pinning, deadlines, the openai backend against a loopback fake, and one usage row per call.

Every call here is paid, so it carries a grant signed as the accountant signs it (fakes/grants.py);
what happens without one is tests/test_grants.py's."""

from __future__ import annotations

import asyncio
import time
from functools import cache
from pathlib import Path

import msgspec
import pytest
from fakes.grants import granted
from helpers import eventually, kill_switch, shipped_catalog
from helpers import make_request as _make_request
from mesh_client import call, stream_messages, usage_events

from schemas.messages import ChatMessage, InferenceRequest, Usage
from schemas.subjects import STREAM_DLQ
from services.inference.backend import BackendError
from services.inference.replay import ReplayBackend, frontier_baseline, index_records, replay
from services.runtime.bus import encode
from services.runtime.control import set_kill
from services.runtime.data import Record, load_recorded_outcomes
from services.runtime.tokens import count_message_tokens, count_tokens

LOCAL_MODEL = "mixtral-8x7b-local"
FRONTIER = "gpt-4-1106-preview"
CATALOG = shipped_catalog()


@cache
def records(data_dir: Path) -> tuple[Record, ...]:
    return tuple(load_recorded_outcomes(data_dir))


@pytest.fixture
def gsm8k(data_dir) -> Record:
    column = CATALOG.model(LOCAL_MODEL).recorded_as
    return next(r for r in records(data_dir) if r.dataset == "gsm8k" and r.responses.get(column))


@pytest.fixture
def mmlu(data_dir) -> Record:
    return next(r for r in records(data_dir) if r.dataset.startswith("mmlu/"))


def unsigned_request(model: str, prompt: str, **options) -> InferenceRequest:
    """A call as the router sends it for an "answer" step: a system message, then the prompt."""
    return _make_request(model, prompt, system="Answer the question.", step_id="answer", **options)


def make_request(model: str, prompt: str, **options) -> InferenceRequest:
    """``unsigned_request`` with the grant the accountant would have signed for it."""
    return granted(unsigned_request(model, prompt, **options))


@pytest.mark.infra
async def test_local_replay_answers_a_recorded_gsm8k_prompt_with_real_tokens_and_cost(
    settings, start_service, nc, gsm8k
):
    await start_service("local-inference", settings)
    model = CATALOG.model(LOCAL_MODEL)
    request = make_request(LOCAL_MODEL, gsm8k.prompt)

    result = await call(nc, settings.subjects.infer_local(LOCAL_MODEL), request)

    assert result.error is None
    assert result.output == gsm8k.responses[model.recorded_as]
    assert result.finish_reason == "stop"
    assert result.graded is gsm8k.correct[model.recorded_as]
    assert result.usage.output_tokens == count_tokens("mistral-v1", result.output) > 0
    assert result.usage.input_tokens == count_message_tokens("mistral-v1", request.messages) > 0
    assert result.cost_usd == pytest.approx(model.cost(result.usage)) and result.cost_usd > 0
    assert (result.provider_model, result.provider, result.tier) == (LOCAL_MODEL, "local", "local")
    [event] = await usage_events(nc, settings)
    assert (event.event_id, event.call_id, event.tenant, event.task_id) == (
        request.call_id,
        request.call_id,
        "acme",
        "task-1",
    )
    assert (event.service, event.outcome, event.usage_source) == ("local-inference", "ok", "provider")
    assert (event.model, event.requested_model, event.provider, event.tier) == (
        LOCAL_MODEL,
        LOCAL_MODEL,
        "local",
        "local",
    )
    assert (event.input_tokens, event.output_tokens, event.cost_usd) == (
        result.usage.input_tokens,
        result.usage.output_tokens,
        result.cost_usd,
    )


@pytest.mark.infra
async def test_cloud_replay_serves_its_provider_and_meters_every_call(settings, start_service, nc, gsm8k, mmlu):
    await start_service("cloud-inference", settings)
    subject = settings.subjects.infer_cloud("openai")
    requests = [make_request(FRONTIER, gsm8k.prompt), make_request(FRONTIER, mmlu.prompt)]

    results = [await call(nc, subject, r) for r in requests]

    assert results[0].output == gsm8k.responses[FRONTIER]
    expected = "correct" if mmlu.correct[FRONTIER] else "incorrect"
    assert results[1].output == f"(recorded outcome: {expected})"
    assert results[1].usage.output_tokens == count_tokens("cl100k", results[1].output)
    events = await usage_events(nc, settings)
    assert [e.event_id for e in events] == [r.call_id for r in requests]
    assert {e.service for e in events} == {"cloud-inference"}
    assert [e.cost_usd for e in events] == [r.cost_usd for r in results]


@pytest.mark.infra
async def test_an_unrecorded_prompt_is_an_unavailable_error_with_one_usage_row(settings, start_service, nc):
    await start_service("local-inference", settings)
    request = make_request(LOCAL_MODEL, "Write a haiku about NATS.")

    result = await call(nc, settings.subjects.infer_local(LOCAL_MODEL), request)

    assert result.error is not None and result.error.kind == "unavailable"
    assert "only answers recorded prompts" in result.error.message
    assert result.output == "" and result.cost_usd == 0
    [event] = await usage_events(nc, settings)
    assert (event.event_id, event.outcome, event.cost_usd) == (request.call_id, "error", 0)


@pytest.mark.infra
@pytest.mark.parametrize(
    ("service", "model", "subject_of"),
    [
        # a cloud model asked of local-inference
        ("local-inference", FRONTIER, lambda s: s.infer_local(FRONTIER)),
        # a model of provider "together" sent to the "openai" provider's subject
        ("cloud-inference", "mixtral-8x7b", lambda s: s.infer_cloud("openai")),
        # a model the catalogue does not know
        ("local-inference", None, lambda s: s.infer_local("no-such-model")),
    ],
)
async def test_a_model_this_service_does_not_serve_is_a_pinning_error(
    settings, start_service, nc, gsm8k, service, model, subject_of
):
    await start_service(service, settings)
    request = make_request(model or LOCAL_MODEL, gsm8k.prompt)
    if model is None:
        request = msgspec.structs.replace(request, model="no-such-model")

    result = await call(nc, subject_of(settings.subjects), request)

    assert result.error is not None and result.error.kind == "pinning"
    assert result.output == "" and result.usage == Usage()
    [event] = await usage_events(nc, settings)
    assert (event.outcome, event.requested_model, event.cost_usd) == ("error", request.model, 0)


@pytest.mark.infra
async def test_a_call_past_its_deadline_does_not_run_and_is_metered_as_timeout(settings, start_service, nc, gsm8k):
    await start_service("local-inference", settings)
    request = make_request(LOCAL_MODEL, gsm8k.prompt, deadline_s=-1)

    result = await call(nc, settings.subjects.infer_local(LOCAL_MODEL), request)

    assert result.error is not None and result.error.kind == "timeout"
    assert result.output == ""
    [event] = await usage_events(nc, settings)
    assert (event.event_id, event.outcome, event.input_tokens, event.cost_usd) == (request.call_id, "timeout", 0, 0)


@pytest.mark.infra
async def test_an_invalid_request_is_dead_lettered_and_rejected(settings, start_service, nc):
    await start_service("local-inference", settings)
    subject = settings.subjects.infer_local(LOCAL_MODEL)

    reply = await nc.request(subject, b'{"call_id": "x"}', timeout=5)
    bad_tenant = make_request(LOCAL_MODEL, "q", tenant="a.b")
    reply_tenant = await nc.request(subject, encode(bad_tenant), timeout=5)

    assert msgspec.json.decode(reply.data)["error"]["kind"] == "invalid"
    assert "subject token" in msgspec.json.decode(reply_tenant.data)["error"]["message"]
    letters = [msgspec.json.decode(d) for d in await stream_messages(nc, settings, STREAM_DLQ)]
    assert [(d["service"], d["subject"]) for d in letters] == [("local-inference", subject)] * 2
    assert await usage_events(nc, settings) == []


@pytest.mark.unit
def test_replay_clips_output_at_max_tokens(gsm8k):
    model = CATALOG.model(FRONTIER)
    messages = [ChatMessage(role="user", content=gsm8k.prompt)]

    completion = replay(gsm8k, model, messages, max_tokens=5)

    assert completion.finish_reason == "length"
    assert completion.usage.output_tokens == 5
    assert gsm8k.responses[FRONTIER].startswith(completion.output) and completion.output


@pytest.mark.unit
async def test_replay_backend_refuses_a_request_without_a_user_message(data_dir):
    backend = ReplayBackend(index_records(records(data_dir)))
    request = msgspec.structs.replace(
        unsigned_request(FRONTIER, "x"), messages=[ChatMessage(role="system", content="x")]
    )

    with pytest.raises(BackendError) as caught:
        await backend.complete(CATALOG.model(FRONTIER), request)

    assert caught.value.kind == "unavailable"


@pytest.mark.unit
def test_frontier_baseline_prices_each_prompt_on_the_frontier_model(gsm8k, mmlu):
    baseline = frontier_baseline(CATALOG, [gsm8k, mmlu])

    model = CATALOG.model(FRONTIER)
    one = replay(gsm8k, model, [ChatMessage(role="user", content=gsm8k.prompt)], 512)
    two = replay(mmlu, model, [ChatMessage(role="user", content=mmlu.prompt)], 512)
    assert (baseline.model, baseline.tier, baseline.calls) == (FRONTIER, "frontier", 2)
    assert baseline.output_tokens == one.usage.output_tokens + two.usage.output_tokens
    assert baseline.cost_usd == pytest.approx(model.cost(one.usage) + model.cost(two.usage))
    assert baseline.accuracy == (gsm8k.correct[FRONTIER] + mmlu.correct[FRONTIER]) / 2


# -- cloud-inference with the openai backend, against a loopback fake of the paid API --


@pytest.mark.infra
async def test_cloud_openai_backend_meters_the_providers_usage(openai_settings, start_service, nc, fake_openai):
    settings = openai_settings
    fake_openai.behaviour.model = "gpt-4-1106-preview-served"
    fake_openai.behaviour.prompt_tokens = 1000
    fake_openai.behaviour.cached_tokens = 400
    await start_service("cloud-inference", settings)
    request = make_request(FRONTIER, "What is six times seven?")

    result = await call(nc, settings.subjects.infer_cloud("openai"), request)

    assert result.error is None
    assert (result.output, result.finish_reason) == ("The answer is 42.", "stop")
    assert result.usage == Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=4)
    assert result.cost_usd == pytest.approx(CATALOG.model(FRONTIER).cost(result.usage))
    assert (result.model, result.provider_model) == (FRONTIER, "gpt-4-1106-preview-served")
    assert fake_openai.requests[0].body["model"] == FRONTIER
    [event] = await usage_events(nc, settings)
    assert (event.model, event.requested_model, event.usage_source) == (
        "gpt-4-1106-preview-served",
        FRONTIER,
        "provider",
    )
    assert (event.input_tokens, event.cached_input_tokens, event.output_tokens) == (1000, 400, 4)


@pytest.mark.infra
async def test_cloud_openai_stream_without_usage_is_metered_at_worst_case(
    openai_settings, start_service, nc, fake_openai
):
    settings = openai_settings
    fake_openai.behaviour.usage = False
    await start_service("cloud-inference", settings)
    request = make_request(FRONTIER, "What is six times seven?", max_tokens=200)

    result = await call(nc, settings.subjects.infer_cloud("openai"), request)

    assert result.output == "The answer is 42."
    assert result.usage.output_tokens == 200
    assert result.usage.input_tokens == count_message_tokens("cl100k", request.messages)
    [event] = await usage_events(nc, settings)
    assert (event.outcome, event.usage_source, event.output_tokens) == ("ok", "estimated", 200)
    assert event.cost_usd == pytest.approx(CATALOG.model(FRONTIER).worst_case_cost(event.input_tokens, 200))


@pytest.mark.infra
async def test_cloud_openai_call_cut_at_its_deadline_closes_the_stream_and_meters_a_timeout(
    openai_settings, start_service, nc, fake_openai
):
    settings = openai_settings
    fake_openai.behaviour.reply = "word " * 200
    fake_openai.behaviour.token_delay_s = 0.02
    await start_service("cloud-inference", settings)
    request = make_request(FRONTIER, "Count slowly.", max_tokens=300, deadline_s=0.3)

    result = await call(nc, settings.subjects.infer_cloud("openai"), request)

    assert result.error is not None and result.error.kind == "timeout"
    assert await asyncio.to_thread(fake_openai.disconnects.wait, 5), "the provider never saw the stream closed"
    [event] = await usage_events(nc, settings)
    assert (event.outcome, event.usage_source, event.output_tokens) == ("timeout", "estimated", 300)
    assert event.cost_usd > 0


@pytest.mark.infra
async def test_cloud_openai_rate_limit_is_a_retryable_error_with_one_unbilled_row(
    openai_settings, start_service, nc, fake_openai
):
    settings = openai_settings
    fake_openai.behaviour.status = 429
    await start_service("cloud-inference", settings)
    request = make_request(FRONTIER, "What is six times seven?")

    result = await call(nc, settings.subjects.infer_cloud("openai"), request)

    assert result.error is not None
    assert (result.error.kind, result.error.retryable) == ("provider", True)
    [event] = await usage_events(nc, settings)
    assert (event.outcome, event.cost_usd, event.usage_source) == ("error", 0, "provider")


@pytest.mark.infra
async def test_one_replica_runs_calls_concurrently(openai_settings, start_service, nc, fake_openai):
    settings = openai_settings
    fake_openai.behaviour.token_delay_s = 0.1  # 7 events: each call takes about 0.7 s
    await start_service("cloud-inference", settings)
    requests = [make_request(FRONTIER, f"Question {i}?") for i in range(6)]

    started = time.monotonic()
    results = await asyncio.gather(*(call(nc, settings.subjects.infer_cloud("openai"), r) for r in requests))
    elapsed = time.monotonic() - started

    assert [r.error for r in results] == [None] * 6
    assert elapsed < 2.5, f"6 calls of ~0.7 s took {elapsed:.2f}s: they ran one after another"
    assert sorted(e.event_id for e in await usage_events(nc, settings)) == sorted(r.call_id for r in requests)


@pytest.mark.infra
async def test_a_key_kill_switch_cancels_that_keys_calls_in_flight(
    openai_settings, start_service, nc, fake_openai, bus
):
    settings = openai_settings
    fake_openai.behaviour.reply = "word " * 200
    fake_openai.behaviour.token_delay_s = 0.02
    await start_service("cloud-inference", settings)
    subject = settings.subjects.infer_cloud("openai")
    doomed, spared = (
        granted(msgspec.structs.replace(unsigned_request(FRONTIER, "Count slowly.", max_tokens=300), key_id=key))
        for key in ("fmk_doomed", "fmk_spared")
    )

    running = [asyncio.create_task(call(nc, subject, r)) for r in (doomed, spared)]
    await eventually(lambda: len(fake_openai.requests) == 2)
    await set_kill(bus, kill_switch("key", "fmk_doomed"))
    killed, finished = await asyncio.gather(*running)

    assert killed.error is not None and killed.error.kind == "killed" and "fmk_doomed" in killed.error.message
    assert finished.error is None
    events = {e.event_id: e for e in await usage_events(nc, settings)}
    assert (events[doomed.call_id].outcome, events[doomed.call_id].key_id) == ("killed", "fmk_doomed")
    assert (events[spared.call_id].outcome, events[spared.call_id].key_id) == ("ok", "fmk_spared")


@pytest.mark.infra
async def test_a_call_streaming_into_the_mesh_is_dead_lettered_and_rejected(settings, start_service, nc, gsm8k):
    await start_service("local-inference", settings)
    subject = settings.subjects.infer_local(LOCAL_MODEL)
    into_usage = settings.subjects.usage("acme")
    request = msgspec.structs.replace(make_request(LOCAL_MODEL, gsm8k.prompt), stream_to=into_usage)

    reply = msgspec.json.decode((await nc.request(subject, encode(request), timeout=5)).data)

    assert reply["error"]["kind"] == "invalid" and "stream_to" in reply["error"]["message"]
    [letter] = [msgspec.json.decode(d) for d in await stream_messages(nc, settings, STREAM_DLQ)]
    assert letter["subject"] == subject
    assert await usage_events(nc, settings) == []
