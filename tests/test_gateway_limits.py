"""Layer 2 for gateway tasks, driven by the official ``openai`` SDK on the real stack (router,
accountant, cloud-inference against the loopback fake of the OpenAI API, gateways on free ports):
requests that share ``X-Frugalmesh-Task`` are one task, in which the same call goes out at most
``identical_calls`` times and all calls at most ``max_calls_per_task`` times, counted in KV so
every replica enforces the same counts. A refused request is the SDK's RateLimitError naming layer 2
and the limit; it reaches no router, so it has no usage row."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import openai
import pytest
from mesh_client import usage_events

from schemas.messages import ChatMessage, ChatOptions, StepRequest
from schemas.subjects import BUCKET_TASK_CALLS
from services.gateway.keys import KeyStore
from services.planner.config import PlannerConfig
from services.runtime.settings import REPO_DEPLOY_DIR, MeshSettings
from services.runtime.task_calls import TaskCalls, call_hash
from services.runtime.task_limits import GatewayLimits, TaskLimits

FRONTIER = "gpt-4-1106-preview"
HELLO = [{"role": "user", "content": "Say the answer."}]
LIMITS = TaskLimits(identical_calls=2, gateway=GatewayLimits(max_calls_per_task=4))


# -- the limits and the call's identity, no server --


@pytest.mark.unit
def test_the_shipped_limits_reuse_the_planners_identical_calls_and_add_gateway_and_agents_tables():
    limits = TaskLimits.load(REPO_DEPLOY_DIR)
    assert (limits.identical_calls, limits.gateway.max_calls_per_task, limits.gateway.task_ttl_s) == (2, 200, 86400)
    assert limits.agents.max_calls_per_task == 100
    # The planner checks the whole file, these tables included.
    assert PlannerConfig.load(REPO_DEPLOY_DIR).agents == limits.agents


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[gateway]\nmax_calls = 3\n", "unknown field"),
        ("[gateway]\nmax_calls_per_task = 0\n", "max_calls_per_task must be 1 to 5000"),
        ("[gateway]\ntask_ttl_s = -1\n", "task_ttl_s must be above 0"),
        ("[agents]\nmax_calls_per_task = 0\n", "agents.max_calls_per_task must be 1 to 5000"),
        ("[agents]\ntask_ttl_s = 60\n", "unknown field"),
        ("[limits]\nidentical_calls = 0\n", "identical_calls must be at least 1"),
    ],
)
def test_bad_limits_stop_the_start_naming_the_file(tmp_path: Path, text, error):
    (tmp_path / "planner.toml").write_text(text)
    with pytest.raises(ValueError, match=error) as bad:
        TaskLimits.load(tmp_path)
    assert "planner.toml" in str(bad.value)


@pytest.mark.unit
def test_the_same_call_is_the_model_the_messages_and_the_options():
    def step(content: str = "Hi", deadline_ms: int = 1, **fields) -> StepRequest:
        return StepRequest(
            task_id="t",
            step_id=f"chat-{deadline_ms}",  # not part of the call: every request gets a new step id
            role="chat",
            messages=[ChatMessage(role="user", content=content)],
            deadline_ms=deadline_ms,
            **fields,
        )

    same = call_hash(FRONTIER, step())
    assert call_hash(FRONTIER, step(deadline_ms=2)) == same
    assert call_hash("frugalmesh/auto", step()) != same
    assert call_hash(FRONTIER, step("Hello")) != same
    assert call_hash(FRONTIER, step(options=ChatOptions(temperature=0.5))) != same
    assert call_hash(FRONTIER, step(max_tokens=9)) != same


# -- through the gateway --


async def start_mesh(settings: MeshSettings, start_service, replicas: int = 1) -> list[str]:
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)
    urls: list[str] = []
    for _ in range(replicas):
        await start_service("gateway", settings, port=0, listening=urls.append, task_limits=LIMITS)
    return [url + "/v1" for url in urls]


async def client(bus, url: str, task: str | None) -> openai.AsyncOpenAI:
    secret, _ = await (await KeyStore.open(bus)).create("acme", name="loops")
    headers = {"X-Frugalmesh-Task": task} if task else {}
    return openai.AsyncOpenAI(base_url=url, api_key=secret, max_retries=0, default_headers=headers)


async def task_events(nc, settings: MeshSettings, task: str) -> list[str]:
    return [e.outcome for e in await usage_events(nc, settings) if e.task_id == task]


@pytest.mark.infra
async def test_the_same_call_past_identical_calls_is_refused_in_its_task_only(
    openai_settings, start_service, bus, nc, fake_openai
):
    [url] = await start_mesh(openai_settings, start_service)
    looping = await client(bus, url, "loop-1")

    for _ in range(2):
        await looping.chat.completions.create(model=FRONTIER, messages=HELLO)
    with pytest.raises(openai.RateLimitError) as refused:
        await looping.chat.completions.create(model=FRONTIER, messages=HELLO)

    error = refused.value
    assert "layer 2" in error.message and "identical_calls" in error.message and "limit is 2" in error.message
    assert error.code == "identical_calls" and error.response.headers["x-should-retry"] == "false"
    # Another call in the task, and the same call in another task or with no task, still go out.
    await looping.chat.completions.create(model=FRONTIER, messages=[{"role": "user", "content": "Other."}])
    await (await client(bus, url, "loop-2")).chat.completions.create(model=FRONTIER, messages=HELLO)
    for _ in range(3):
        await (await client(bus, url, None)).chat.completions.create(model=FRONTIER, messages=HELLO)
    # The refusal reached no router: the task's rows are its three calls (the repeat a cache hit).
    assert await task_events(nc, openai_settings, "loop-1") == ["ok", "cache_hit", "ok"]


@pytest.mark.infra
async def test_a_task_past_max_calls_per_task_is_refused_whatever_it_asks(openai_settings, start_service, bus, nc):
    [url] = await start_mesh(openai_settings, start_service)
    runaway = await client(bus, url, "runaway-1")

    for turn in range(4):
        await runaway.chat.completions.create(model=FRONTIER, messages=[{"role": "user", "content": f"Turn {turn}."}])
    with pytest.raises(openai.RateLimitError) as refused:
        await runaway.chat.completions.create(model=FRONTIER, messages=[{"role": "user", "content": "Turn 4."}])

    assert "layer 2" in refused.value.message and "4 calls" in refused.value.message
    assert refused.value.code == "max_calls_per_task" and "max_calls_per_task" in refused.value.message
    stream = await (await client(bus, url, "runaway-2")).chat.completions.create(
        model=FRONTIER, messages=HELLO, stream=True
    )
    assert [c async for c in stream]
    assert len(await task_events(nc, openai_settings, "runaway-1")) == 4


@pytest.mark.infra
async def test_replicas_share_the_counts_so_concurrent_repeats_pass_the_limit_exactly(
    openai_settings, start_service, bus
):
    urls = await start_mesh(openai_settings, start_service, replicas=2)
    clients = [await client(bus, url, "fanout-1") for url in urls]

    async def ask(i: int) -> str:
        try:
            await clients[i % 2].chat.completions.create(model=FRONTIER, messages=HELLO)
        except openai.RateLimitError as exc:
            return str(exc.code)
        return "ok"

    outcomes = await asyncio.gather(*(ask(i) for i in range(10)))

    assert sorted(outcomes) == ["identical_calls"] * 8 + ["ok"] * 2


@pytest.mark.infra
async def test_the_counts_are_one_kv_value_per_tenant_and_task(openai_settings, start_service, bus):
    [url] = await start_mesh(openai_settings, start_service)
    await (await client(bus, url, "kv-1")).chat.completions.create(model=FRONTIER, messages=HELLO)

    kv = await bus.key_value(bus.subjects.bucket(BUCKET_TASK_CALLS))
    counts = msgspec.json.decode((await kv.get("gateway.acme.kv-1")).value, type=TaskCalls)
    assert counts.calls == 1 and list(counts.same.values()) == [1]
    assert (await kv.status()).ttl == pytest.approx(LIMITS.gateway.task_ttl_s)
