"""An agent service's own model calls through the live router (a StepRequest with ``agent`` set):
the agent's name on every usage row, down to ClickHouse, and layer 2 (anti-loop) enforced by the
router, since an agent may be written in any language. The inference tier is cloud-inference on
its replay backend, so answers are recorded GSM8K ones; reservations come from a granting test peer,
or from the real accountant where the rows must reach ClickHouse."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from helpers import kill_switch, make_request, make_step
from mesh_client import ask, usage_events, usage_rows
from nats.js.errors import KeyNotFoundError

from schemas.messages import Rejection, StepRequest, Usage, UsageEvent
from schemas.subjects import BUCKET_TASK_CALLS
from services.runtime.control import set_kill
from services.runtime.data import load_recorded_outcomes
from services.runtime.settings import MeshSettings
from services.runtime.streams import ensure_streams
from services.runtime.task_calls import TaskCalls
from services.runtime.task_limits import AgentLimits, TaskLimits
from services.runtime.usage import usage_event

FRONTIER = "gpt-4-1106-preview"
LIMITS = TaskLimits(identical_calls=2, agents=AgentLimits(max_calls_per_task=3))



def agent_step(prompt: str, task: str, agent: str = "critic") -> StepRequest:
    # The rules send "review" to the frontier model: a paid call, reserved and priced.
    return make_step(prompt, role="review", task_id=task, agent=agent)


async def start_mesh(settings: MeshSettings, start_service, nc, *, accountant: bool = False) -> None:
    if accountant:
        await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0)
    else:
        await BudgetPeer(nc, settings.subjects).start()
    await start_service("cloud-inference", settings)
    await start_service("router", settings, task_limits=LIMITS)
    await nc.flush()


async def outcomes(nc, settings: MeshSettings, task: str) -> list[tuple[str, str, float]]:
    """(outcome, agent, cost) of the task's usage rows, in order."""
    return [(e.outcome, e.agent, e.cost_usd) for e in await usage_events(nc, settings) if e.task_id == task]


@pytest.mark.unit
def test_the_usage_row_takes_the_agent_from_the_step_or_the_request():
    ended = {"service": "router", "tier": "frontier", "provider": "openai", "model": FRONTIER,
             "requested_model": FRONTIER, "usage": Usage(), "cost_usd": 0.0, "latency_ms": 1.0,
             "outcome": "refused"}  # fmt: skip
    request = msgspec.structs.replace(make_request(FRONTIER, "hi"), agent="writer")
    rows: list[UsageEvent] = [
        usage_event(make_step(agent="critic"), "c1", **ended),
        usage_event(request, "c2", **ended),
        usage_event(make_step(), "c3", **ended),
    ]
    assert [e.agent for e in rows] == ["critic", "writer", ""]


@pytest.mark.infra
async def test_an_agents_call_lands_in_clickhouse_with_its_name_and_cost(settings, start_service, nc, ch, prompts):
    await start_mesh(settings, start_service, nc, accountant=True)

    result = await ask(nc, settings, agent_step(next(prompts), "agent-cost-1"))
    planner = await ask(nc, settings, make_step(next(prompts), role="review", task_id="agent-cost-1"))

    assert result.error is None and planner.error is None and result.cost_usd > 0
    database = settings.subject_prefix
    rows = await usage_rows(
        settings.clickhouse_url, database, "task_id = %(t)s", {"t": "agent-cost-1"},
        columns="call_id, agent, toFloat64(cost_usd) AS cost", expected=2,
    )  # fmt: skip
    assert {(r["call_id"], r["agent"]) for r in rows} == {(result.call_id, "critic"), (planner.call_id, "")}
    spend = ch.query(
        f"SELECT agent, toFloat64(sum(cost_usd)) FROM {database}.usage_events FINAL GROUP BY agent ORDER BY agent"
    ).result_rows
    assert spend == [("", pytest.approx(planner.cost_usd)), ("critic", pytest.approx(result.cost_usd))]


@pytest.mark.infra
async def test_the_same_agent_call_a_third_time_is_refused_in_its_task_only(settings, start_service, nc, prompts):
    await start_mesh(settings, start_service, nc)
    prompt = next(prompts)

    answered = [await ask(nc, settings, agent_step(prompt, "loop-1")) for _ in range(2)]
    refused = await ask(nc, settings, agent_step(prompt, "loop-1"))

    assert [r.error for r in answered] == [None, None] and answered[1].cache_hit
    assert refused.error is not None and (refused.error.kind, refused.error.retryable) == ("refused", False)
    assert refused.error.message.startswith("layer 2 (anti-loop):") and "identical_calls" in refused.error.message
    assert (refused.model, refused.cost_usd) == (FRONTIER, 0)
    # The same call in another task still goes out (from the cache).
    assert (await ask(nc, settings, agent_step(prompt, "loop-2"))).error is None
    assert await outcomes(nc, settings, "loop-1") == [
        ("ok", "critic", answered[0].cost_usd),
        ("cache_hit", "critic", 0),
        ("refused", "critic", 0),
    ]


@pytest.mark.infra
async def test_the_agents_of_a_task_past_max_calls_per_task_are_refused(settings, start_service, nc, prompts):
    await start_mesh(settings, start_service, nc)

    # Every agent of the task counts towards one limit.
    for agent in ("critic", "critic", "writer"):
        assert (await ask(nc, settings, agent_step(next(prompts), "runaway-1", agent))).error is None
    refused = await ask(nc, settings, agent_step(next(prompts), "runaway-1", "writer"))

    assert refused.error is not None and refused.error.kind == "refused" and not refused.error.retryable
    assert refused.error.message.startswith("layer 2 (anti-loop):")
    assert "3 calls" in refused.error.message and "max_calls_per_task" in refused.error.message
    assert [o for o, _, _ in await outcomes(nc, settings, "runaway-1")] == ["ok", "ok", "ok", "refused"]


@pytest.mark.infra
async def test_steps_without_an_agent_are_not_counted(settings, start_service, nc, bus, prompts):
    await start_mesh(settings, start_service, nc)
    prompt = next(prompts)

    results = [await ask(nc, settings, make_step(prompt, role="review", task_id="planner-1")) for _ in range(3)]

    assert [r.error for r in results] == [None] * 3
    kv = await bus.key_value(bus.subjects.bucket(BUCKET_TASK_CALLS))
    with pytest.raises(KeyNotFoundError):
        await kv.get("agent.acme.planner-1")
    # The task's agents still get their whole allowance; their counts are one value per tenant and task.
    assert (await ask(nc, settings, agent_step(prompt, "planner-1"))).error is None
    counts = msgspec.json.decode((await kv.get("agent.acme.planner-1")).value, type=TaskCalls)
    assert counts.calls == 1


@pytest.mark.infra
async def test_an_agent_step_whose_task_id_cannot_be_a_key_is_rejected(settings, start_service, nc):
    await start_mesh(settings, start_service, nc)

    reply = await nc.request(
        settings.subjects.step_request, msgspec.json.encode(agent_step("Hi", "task.with.dots")), timeout=5
    )

    rejection = msgspec.json.decode(reply.data, type=Rejection)
    assert rejection.error.kind == "invalid" and "task.with.dots" in rejection.error.message


@pytest.mark.infra
async def test_a_killed_task_refuses_its_agents_calls(settings, start_service, nc, bus, prompts):
    # Tripped before the mesh starts: a router reads the switch before it takes a step.
    await ensure_streams(nc.jetstream(), settings.subjects)
    await set_kill(bus, kill_switch("task", "acme.killed-1"))
    await start_mesh(settings, start_service, nc)

    killed = await ask(nc, settings, agent_step(next(prompts), "killed-1"))

    assert killed.error is not None and killed.error.kind == "killed"
    assert await outcomes(nc, settings, "killed-1") == [("killed", "critic", 0)]
    assert (await ask(nc, settings, agent_step(next(prompts), "alive-1"))).error is None
    # Task ids are unique only within a tenant: the switch of acme's killed-1 is not globex's.
    other_tenant = msgspec.structs.replace(agent_step(next(prompts), "killed-1"), tenant="globex")
    assert (await ask(nc, settings, other_tenant)).error is None
