"""A virtual key's own cap (budget scope ``key``) through the gateway, driven by the official ``openai``
SDK on the real stack: a refused call is the SDK's RateLimitError naming the key's cap, and under
1,000 concurrent streamed calls with twice the cap's worth of demand, settled spend never passes the
cap and every call has exactly one usage row."""

from __future__ import annotations

import asyncio

import nats.errors
import openai
import pytest
from helpers import budget_set, eventually
from mesh_client import usage_rows

from schemas.messages import BudgetQuery, BudgetState, BudgetUpdate
from services.gateway.keys import KeyStore, new_key_id
from services.runtime.bus import Bus
from services.runtime.settings import MeshSettings

pytestmark = pytest.mark.infra

FRONTIER = "gpt-4-1106-preview"


async def capped_key(bus: Bus, tenant: str, day_usd: float) -> tuple[str, str]:
    """A key of ``tenant`` with its own day cap, set with the accountant first (as the CLI does)."""
    store = await KeyStore.open(bus)
    key_id = new_key_id()
    state = await bus.request(
        budget_set(bus.subjects), BudgetUpdate(scope="key", key=key_id, day_usd=day_usd), BudgetState, 5
    )
    assert state.error is None
    secret, _ = await store.create(tenant, key_id=key_id)
    return secret, key_id


async def start_mesh(settings: MeshSettings, start_service) -> str:
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)
    urls: list[str] = []
    await start_service("gateway", settings, port=0, listening=urls.append)
    return urls[0] + "/v1"


async def test_a_call_past_the_keys_cap_is_a_rate_limit_error_that_names_the_key(
    openai_settings, start_service, bus, fake_openai
):
    url = await start_mesh(openai_settings, start_service)
    secret, key_id = await capped_key(bus, "acme", day_usd=0.001)
    client = openai.AsyncOpenAI(base_url=url, api_key=secret, max_retries=0)

    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(
            model=FRONTIER, messages=[{"role": "user", "content": "Hi"}], max_tokens=100
        )
    assert f"key {key_id} day cap" in refused.value.message
    assert fake_openai.requests == []


@pytest.mark.slow
async def test_1000_concurrent_streams_never_spend_past_the_keys_cap_and_each_is_one_row(
    openai_settings, start_service, bus, fake_openai
):
    settings = openai_settings
    fake_openai.behaviour.reply = "word " * 60  # 60 output tokens: about $0.0018 a call at $30/M
    url = await start_mesh(settings, start_service)
    secret, key_id = await capped_key(bus, "capped", day_usd=1.0)
    client = openai.AsyncOpenAI(
        base_url=url, api_key=secret, max_retries=0, default_headers={"X-Frugalmesh-Deadline": "120"}
    )

    async def one(i: int) -> str:
        try:
            stream = await client.chat.completions.create(
                model=FRONTIER, messages=[{"role": "user", "content": f"Count {i}."}], max_tokens=64, stream=True
            )
            finished = [c async for c in stream if c.choices and c.choices[0].finish_reason]
        except (openai.RateLimitError, openai.PermissionDeniedError) as exc:
            return f"refused {exc.status_code}"
        assert finished[0].usage.completion_tokens == 60
        return "ok"

    outcomes = await asyncio.gather(*(one(i) for i in range(1000)))

    ok = outcomes.count("ok")
    assert 400 < ok < 600 and len(outcomes) == 1000, {o: outcomes.count(o) for o in set(outcomes)}
    rows = await usage_rows(
        settings.clickhouse_url,
        settings.subject_prefix,
        "tenant = %(t)s",
        {"t": "capped"},
        columns="call_id, outcome, cost_usd",
        expected=1000,
    )
    assert len(rows) == 1000 and len({r["call_id"] for r in rows}) == 1000
    assert sum(r["outcome"] == "ok" for r in rows) == ok
    spent = sum(float(r["cost_usd"]) for r in rows)
    assert 0.9 < spent <= 1.0


    async def settled_day():
        """The key's day once every hold is settled. A thousand streams in this one process can starve the
        accountant's lease renewal, and a new term then takes over: settles it missed come from the
        routers' outboxes, so the books are whole once the term is up and they have landed."""
        query = BudgetQuery(scope="key", key=key_id)
        try:
            reply = await bus.request(settings.subjects.budget_show, query, BudgetState, 5)
        except nats.errors.NoRespondersError:  # between two terms
            return None
        [day] = [s for s in reply.spend if s.window == "day"]
        return day if day.reserved_usd == 0 else None

    day = await eventually(settled_day, timeout_s=60, interval_s=0.5, message="holds left unsettled")
    assert day.settled_usd == pytest.approx(spent) and day.settled_usd <= 1.0
