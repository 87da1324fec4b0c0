"""The gateway driven by the official ``openai`` SDK (a client nobody here wrote) on the real stack:
router, accountant, cloud-inference on its openai backend against a loopback fake of the OpenAI
API, and the gateway on a free port, all on a real nats-server and ClickHouse.

What an agent sees: completions streamed and not, each with usage and its cost; every error as the
SDK's own exception type; what ClickHouse keeps: exactly one usage row per call, under the key's
tenant. The gateway's own side of a stream (relay, tool-call deltas, the error before and after the
first byte) against a router stand-in is tests/test_gateway_stream.py; keys: test_gateway_keys.py;
a key's own cap under 1,000 concurrent streams: test_gateway_cap.py; the npm SDK: test_gateway_node.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import openai
import pytest
from fakes.deploy import fake_providers_deploy
from helpers import eventually, kill_switch
from mesh_client import usage_events, usage_rows

from schemas.messages import VirtualKey
from services.gateway.keys import KeyStore
from services.runtime.control import set_kill
from services.runtime.settings import MeshSettings

pytestmark = pytest.mark.infra

FRONTIER = "gpt-4-1106-preview"  # on provider openai: the fake API
MID = "mixtral-8x7b"  # provider together: replay, which answers only recorded prompts
HELLO = [{"role": "user", "content": "Say the answer."}]
# $10 per million input tokens, $30 per million output (deploy/models.toml).
IN_PRICE, OUT_PRICE = 10e-6, 30e-6


@dataclass
class Mesh:
    settings: MeshSettings
    url: str
    secret: str
    key: VirtualKey

    def client(self, secret: str | None = None, **options) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=secret or self.secret, max_retries=0, **options)


async def create_key(bus, tenant: str = "acme", **fields) -> tuple[str, VirtualKey]:
    return await (await KeyStore.open(bus)).create(tenant, **fields)


@pytest.fixture
def start_gateway(start_service):
    """``await start_gateway(settings)``: a gateway on a free port; returns its base URL (``.../v1``)."""

    async def start(settings: MeshSettings) -> str:
        urls: list[str] = []
        await start_service("gateway", settings, port=0, listening=urls.append)
        return urls[0] + "/v1"

    return start


@pytest.fixture
async def mesh(openai_settings, start_service, start_gateway, bus) -> Mesh:
    settings = openai_settings
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)
    secret, key = await create_key(bus, name="tests")
    return Mesh(settings, await start_gateway(settings), secret, key)


async def rows(mesh: Mesh, call_id: str, expected: int = 1) -> list[dict]:
    return await usage_rows(
        mesh.settings.clickhouse_url,
        mesh.settings.subject_prefix,
        "call_id = %(c)s",
        {"c": call_id},
        columns="tenant, task_id, model, outcome, cost_usd, input_tokens, output_tokens",
        expected=expected,
    )


async def test_a_completion_carries_usage_cost_and_headers_and_is_one_usage_row_of_the_keys_tenant(mesh, fake_openai):
    raw = await mesh.client().chat.completions.with_raw_response.create(model=FRONTIER, messages=HELLO)
    completion = raw.parse()

    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == FRONTIER
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 4, 7)
    cost = completion.model_extra["frugalmesh"]
    assert cost["cost_usd"] == pytest.approx(3 * IN_PRICE + 4 * OUT_PRICE)
    assert (cost["model"], cost["tier"], cost["cache_hit"]) == (FRONTIER, "frontier", False)
    headers = raw.headers
    assert headers["x-frugalmesh-call-id"] == cost["call_id"]
    assert (headers["x-frugalmesh-model"], headers["x-frugalmesh-tier"]) == (FRONTIER, "frontier")
    assert float(headers["x-frugalmesh-cost-usd"]) == pytest.approx(cost["cost_usd"])
    assert headers["x-frugalmesh-cache"] == "miss"
    assert fake_openai.requests[0].body["model"] == FRONTIER
    [row] = await rows(mesh, cost["call_id"])
    assert (row["tenant"], row["model"], row["outcome"]) == ("acme", FRONTIER, "ok")
    assert float(row["cost_usd"]) == pytest.approx(cost["cost_usd"])


async def test_the_same_request_again_is_a_free_cache_hit_and_says_so(mesh):
    client = mesh.client()
    await client.chat.completions.create(model=FRONTIER, messages=HELLO)
    raw = await client.chat.completions.with_raw_response.create(model=FRONTIER, messages=HELLO)

    assert raw.headers["x-frugalmesh-cache"] == "hit"
    assert raw.parse().model_extra["frugalmesh"]["cost_usd"] == 0.0


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_ends_with_a_chunk_that_carries_finish_reason_usage_and_cost(mesh, include_usage):
    stream = await mesh.client().chat.completions.create(
        model=FRONTIER,
        messages=[{"role": "user", "content": f"Stream it ({include_usage})."}],
        stream=True,
        stream_options={"include_usage": True} if include_usage else None,
    )
    chunks = [chunk async for chunk in stream]

    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["The", " answer", " is", " 42."]  # relayed as the provider streamed them
    [finishing] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing.choices[0].finish_reason == "stop"
    assert (finishing.usage.prompt_tokens, finishing.usage.completion_tokens) == (3, 4)
    cost = finishing.model_extra["frugalmesh"]
    assert cost["cost_usd"] == pytest.approx(3 * IN_PRICE + 4 * OUT_PRICE) and cost["model"] == FRONTIER
    empty = [c for c in chunks if not c.choices]
    if include_usage:
        assert chunks[-1] is empty[0] and chunks[-1].usage == finishing.usage
    else:
        assert empty == []
    assert {c.id for c in chunks} == {f"chatcmpl-{cost['call_id']}"}
    [row] = await rows(mesh, cost["call_id"])
    assert (row["tenant"], row["outcome"]) == ("acme", "ok")


async def test_a_client_that_drops_a_stream_stops_the_provider_and_the_call_is_one_cancelled_row(mesh, fake_openai):
    fake_openai.behaviour.reply = "word " * 60
    fake_openai.behaviour.token_delay_s = 0.05  # about 3 s in all
    stream = await mesh.client().chat.completions.create(model=FRONTIER, messages=HELLO, stream=True)
    call_id = ""
    async for chunk in stream:
        call_id = chunk.id.removeprefix("chatcmpl-")
        if (chunk.choices[0].delta.content or "").strip():
            break
    await stream.close()

    assert await asyncio.to_thread(fake_openai.disconnects.wait, 5), "the provider never saw the stream closed"
    [row] = await rows(mesh, call_id)
    assert (row["tenant"], row["outcome"]) == ("acme", "cancelled")
    assert 0 < row["output_tokens"] < 60


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_before_any_output_stops_the_provider_and_is_one_cancelled_row(
    mesh, fake_openai, stream
):
    """Non-streamed: the answer would come whole at the end; streamed: the first token comes after the
    client's time-out. Either way the client's leaving cancels the call."""
    fake_openai.behaviour.reply = "word " * 20
    fake_openai.behaviour.token_delay_s = 1.5 if stream else 0.1  # the first word after 1.5 s / 0.1 s
    task = f"leaves-{stream}"
    client = mesh.client(timeout=0.8, default_headers={"X-Frugalmesh-Task": task})

    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model=FRONTIER, messages=HELLO, stream=stream)

    assert await asyncio.to_thread(fake_openai.disconnects.wait, 10), "the provider never saw the call cancelled"
    [row] = await usage_rows(
        mesh.settings.clickhouse_url,
        mesh.settings.subject_prefix,
        "task_id = %(t)s",
        {"t": task},
        columns="tenant, outcome, output_tokens",
    )
    assert (row["tenant"], row["outcome"]) == ("acme", "cancelled")
    assert row["output_tokens"] < 20 and (row["output_tokens"] == 0) == stream


async def test_a_keys_policy_routes_its_auto_calls_and_one_the_router_lacks_is_a_bad_request(
    settings, fake_openai, tmp_path, monkeypatch, start_service, start_gateway, bus
):
    # Both paid providers on the fake, so whichever model a policy picks answers.
    for variable in ("OPENAI_API_KEY", "TOGETHER_API_KEY"):
        monkeypatch.setenv(variable, "sk-test")
    deploy = fake_providers_deploy(tmp_path / "deploy", {"openai": fake_openai.url, "together": fake_openai.url})
    settings = settings.model_copy(update={"deploy_dir": deploy})
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)
    mid_key, _ = await create_key(bus, policy=f"fixed:{MID}")
    plain_key, _ = await create_key(bus)
    odd_key, _ = await create_key(bus, policy="smart")  # `keys create` refuses it; the router must too
    url = await start_gateway(settings)

    def client(secret: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=url, api_key=secret, max_retries=0)

    routed = await client(mid_key).chat.completions.create(model="frugalmesh/auto", messages=HELLO)
    assert routed.model == MID and fake_openai.requests[-1].body["model"] == MID
    # Without a policy the tenant's applies (the shipped rules: a chat step is frontier work) ...
    assert (await client(plain_key).chat.completions.create(model="frugalmesh/auto", messages=HELLO)).model == FRONTIER
    # ... and a pinned model is never re-routed by the key's policy.
    assert (await client(mid_key).chat.completions.create(model=FRONTIER, messages=HELLO)).model == FRONTIER
    sent = len(fake_openai.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        await client(odd_key).chat.completions.create(model="frugalmesh/auto", messages=HELLO)
    assert "unknown policy 'smart'" in refused.value.message
    assert len(fake_openai.requests) == sent


async def test_a_revoked_key_is_refused_by_every_replica_within_a_second(mesh, start_gateway, bus):
    other = mesh.client().with_options(base_url=await start_gateway(mesh.settings))
    for client in (mesh.client(), other):
        await client.models.list()

    await (await KeyStore.open(bus)).revoke(mesh.key.id)
    revoked = time.monotonic()

    async def refused(client: openai.AsyncOpenAI) -> bool:
        try:
            await client.chat.completions.create(model=FRONTIER, messages=HELLO)
        except openai.AuthenticationError as exc:
            return "revoked" in exc.message
        return False

    for client in (mesh.client(), other):
        await eventually(lambda c=client: refused(c), timeout_s=1.0, interval_s=0.01)
    assert time.monotonic() - revoked < 1.0


async def test_an_unknown_key_is_an_authentication_error(mesh):
    with pytest.raises(openai.AuthenticationError):
        await mesh.client("fm-not-a-key").chat.completions.create(model=FRONTIER, messages=HELLO)


async def test_an_unknown_model_is_not_found_and_one_outside_the_keys_list_is_denied(mesh, bus):
    with pytest.raises(openai.NotFoundError) as unknown:
        await mesh.client().chat.completions.create(model="gpt-9", messages=HELLO)
    assert unknown.value.param == "model" and "gpt-9" in unknown.value.message

    secret, _ = await create_key(bus, allow_models=[MID])
    pinned = mesh.client(secret)
    await eventually(lambda: _listed(pinned), timeout_s=2)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await pinned.chat.completions.create(model=FRONTIER, messages=HELLO)
    assert denied.value.code == "model_not_allowed" and MID in denied.value.message
    models = {m.id for m in (await pinned.models.list()).data}
    assert models == {"frugalmesh/auto", MID}


async def _listed(client: openai.AsyncOpenAI) -> bool:
    try:
        await client.models.list()
    except openai.AuthenticationError:
        return False
    return True


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"extra_body": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
async def test_an_unsupported_field_is_a_bad_request_that_names_it(mesh, fake_openai, fields, param):
    request = {"model": FRONTIER, "messages": HELLO} | fields
    with pytest.raises(openai.BadRequestError) as refused:
        await mesh.client().chat.completions.create(**request)
    assert refused.value.param == param
    assert param.split("[")[0].split(".")[-1] in refused.value.message
    assert fake_openai.requests == []


async def test_the_kill_switch_is_a_permission_denied_error_that_says_which_switch(mesh, bus, fake_openai):
    await set_kill(bus, kill_switch("tenant", "acme", reason="runaway agent"))

    async def denied() -> openai.PermissionDeniedError | None:
        try:
            await mesh.client().chat.completions.create(model=FRONTIER, messages=HELLO)
        except openai.PermissionDeniedError as exc:
            return exc
        return None

    error = await eventually(denied, timeout_s=2)
    assert error.code == "kill_switch" and "runaway agent" in error.message
    assert error.response.headers["x-should-retry"] == "false"


async def test_a_task_budget_refusal_is_a_rate_limit_error_that_names_the_cap(mesh, fake_openai):
    client = mesh.client(default_headers={"X-Frugalmesh-Task": "run-1", "X-Frugalmesh-Task-Budget": "0.00001"})
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model=FRONTIER, messages=HELLO, max_tokens=100)
    assert "task" in refused.value.message and refused.value.response.headers["x-should-retry"] == "false"
    assert fake_openai.requests == []


async def test_a_passed_deadline_is_a_504(mesh, fake_openai):
    fake_openai.behaviour.reply = "word " * 40
    fake_openai.behaviour.token_delay_s = 0.05
    client = mesh.client(default_headers={"X-Frugalmesh-Deadline": "0.5"})
    with pytest.raises(openai.InternalServerError) as late:
        await client.chat.completions.create(model=FRONTIER, messages=HELLO)
    assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"


async def test_requests_that_share_a_task_header_are_one_task_in_clickhouse(mesh):
    client = mesh.client(default_headers={"X-Frugalmesh-Task": "agent-run-7", "X-Frugalmesh-Workflow": "my-agent"})
    first = await client.chat.completions.create(model=FRONTIER, messages=HELLO)
    second = await client.chat.completions.create(model="frugalmesh/auto", messages=[{"role": "user", "content": "2?"}])

    assert first.model_extra["frugalmesh"]["task_id"] == second.model_extra["frugalmesh"]["task_id"] == "agent-run-7"
    found = await usage_rows(
        mesh.settings.clickhouse_url,
        mesh.settings.subject_prefix,
        "task_id = %(t)s",
        {"t": "agent-run-7"},
        columns="call_id, tenant",
        expected=2,
    )
    assert sorted(r["call_id"] for r in found) == sorted(
        c.model_extra["frugalmesh"]["call_id"] for c in (first, second)
    )
    assert {r["tenant"] for r in found} == {"acme"}


async def test_usage_events_carry_the_key_id(mesh, nc):
    completion = await mesh.client().chat.completions.create(model=FRONTIER, messages=HELLO)

    call_id = completion.model_extra["frugalmesh"]["call_id"]
    [event] = [e for e in await usage_events(nc, mesh.settings) if e.call_id == call_id]
    assert (event.tenant, event.key_id) == ("acme", mesh.key.id)


async def test_json_schema_output_reaches_the_provider_and_comes_back_as_json(mesh, fake_openai):
    fake_openai.behaviour.reply = '{"answer": 42}'
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}

    completion = await mesh.client().chat.completions.create(
        model=FRONTIER,
        messages=[{"role": "user", "content": "Answer as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )

    assert json.loads(completion.choices[0].message.content) == {"answer": 42}
    sent = fake_openai.requests[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == schema


TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_round_trip(mesh, fake_openai, stream):
    """The model calls two tools, the client answers each, the model answers: streamed tool calls
    arrive as deltas with their index; the SDK's own reply message goes back as history."""
    fake_openai.behaviour.tool_calls = 2
    fake_openai.behaviour.tool_arguments = '{"city": "Oslo"}'
    client = mesh.client()
    messages: list = [{"role": "user", "content": f"Weather and time in Oslo? ({stream})"}]

    if stream:
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model=FRONTIER, messages=messages, tools=TOOLS, stream=True
            )
        ]
        calls: dict[int, dict] = {}
        for chunk in chunks:
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                call = calls.setdefault(
                    delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["id"] += delta.id or ""
                call["function"]["name"] += delta.function.name or ""
                call["function"]["arguments"] += delta.function.arguments or ""
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"
        ]
        assert len(chunks) > 4  # the arguments came piece by piece, as the provider streamed them
        made = [calls[i] for i in sorted(calls)]
        messages.append({"role": "assistant", "content": None, "tool_calls": made})
    else:
        first = await client.chat.completions.create(model=FRONTIER, messages=messages, tools=TOOLS)
        assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
        made = [c.model_dump() for c in first.choices[0].message.tool_calls]
        messages.append(first.choices[0].message)  # as OpenAI's own guide does
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in made] == [
        ("call_fake_0", "weather", '{"city": "Oslo"}'),
        ("call_fake_1", "clock", '{"city": "Oslo"}'),
    ]
    messages += [{"role": "tool", "tool_call_id": c["id"], "content": f"{c['function']['name']}: fine"} for c in made]

    answer = await client.chat.completions.create(model=FRONTIER, messages=messages, tools=TOOLS)

    assert answer.choices[0].message.content == "The answer is 42."
    sent = fake_openai.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_fake_0", "call_fake_1"]
    assert [m["tool_call_id"] for m in sent[2:]] == ["call_fake_0", "call_fake_1"]


async def test_json_object_output(mesh, fake_openai):
    completion = await mesh.client().chat.completions.create(
        model=FRONTIER, messages=[{"role": "user", "content": "JSON please."}], response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content) == {"answer": 42}
    assert fake_openai.requests[0].body["response_format"] == {"type": "json_object"}


async def test_models_health_and_metrics(mesh):
    import httpx

    models = await mesh.client().models.list()
    assert {"frugalmesh/auto", FRONTIER, MID} <= {m.id for m in models.data}
    await mesh.client().chat.completions.create(model=FRONTIER, messages=HELLO)
    base = mesh.url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{base}/health")
        metrics = (await http.get(f"{base}/metrics")).text
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert 'frugalmesh_gateway_requests_total{status="200",stream="false"} 1.0' in metrics
    assert "frugalmesh_gateway_request_seconds_bucket" in metrics


async def test_without_a_router_the_gateway_answers_503(settings, start_gateway, bus):
    secret, _ = await create_key(bus)
    client = openai.AsyncOpenAI(base_url=await start_gateway(settings), api_key=secret, max_retries=0)
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(model=FRONTIER, messages=HELLO)
    assert unavailable.value.status_code == 503 and unavailable.value.code == "no_router"
