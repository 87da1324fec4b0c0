"""Where agents are found: every instance of a ``frugalmesh.agents`` agent is a NATS micro service (ADR-32),
so ``$SRV.INFO|STATS`` describe it, ``live_agent`` / ``agent_instances`` read it back with what it
measured, and `frugalmesh agents` lists it; `frugalmesh agent run` starts one from ``module:attribute``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click
import msgspec
import pytest
from click.testing import CliRunner
from fakes.router_peer import result
from helpers import SHORT, eventually

from frugalmesh.agents import Agent, Context
from schemas.messages import AgentRequest, AgentResult
from schemas.subjects import SRV_INFO, service_subject
from services.cli.agent_commands import AgentListing, agent_group, agents
from services.runtime.agents import agent_instances, live_agent
from services.runtime.bus import now_ms
from services.runtime.settings import MeshSettings

REPO = Path(__file__).resolve().parents[1]

critic = Agent(
    "critic",
    version="1.2.3",
    consumes=["answer"],
    produces=["review"],
    description="reviews an answer",
    cost_usd=0.002,
    latency_s=1.5,
    success_rate=0.9,
)


@critic.handler
async def _review(ctx: Context):
    reply = await ctx.llm([{"role": "user", "content": ctx.goal}], role="review")
    return await ctx.put("review", {"text": reply.output, "model": reply.model, "verdict": "accept"})


def review_request() -> AgentRequest:
    return AgentRequest(
        task_id=uuid.uuid4().hex[:12], step_id="review", agent="critic", goal=SHORT, artifact="review",
        deadline_ms=now_ms() + 10_000,
    )  # fmt: skip


async def review(bus) -> AgentResult:
    return await bus.request(bus.subjects.agent("critic"), review_request(), AgentResult, 10)


@pytest.mark.infra
async def test_srv_info_describes_an_instance_with_its_metadata_and_endpoint(settings, bus, start_agent):
    await start_agent(critic, settings)

    [info] = [json.loads(reply) for reply in await bus.gather(service_subject(SRV_INFO, "critic"), 0.3)]

    assert (info["name"], info["version"], info["description"]) == ("critic", "1.2.3", "reviews an answer")
    assert info["metadata"] == {
        "frugalmesh_prefix": settings.subject_prefix,
        "consumes": "answer",
        "produces": "review",
        "cost_usd": "0.002",
        "latency_s": "1.5",
        "success_rate": "0.9",
    }
    [endpoint] = info["endpoints"]
    assert (endpoint["subject"], endpoint["queue_group"]) == (settings.subjects.agent("critic"), "critic")


@pytest.mark.infra
async def test_the_registry_reads_measured_stats_and_forgets_a_stopped_instance(
    settings, bus, start_service, start_agent, router_peers
):
    await start_service("artifact-store", settings)
    await router_peers(settings, lambda step: result(step, "Looks right.", cost_usd=0.004))
    app = await start_agent(critic, settings)
    # The same agent serving another mesh on the same NATS account is not this mesh's.
    # (New settings: a model_copy would keep the cached ``subjects`` of the old prefix.)
    other_mesh = MeshSettings(nats_url=settings.nats_url, subject_prefix=settings.subject_prefix + "x")
    await start_agent(critic, other_mesh)

    assert (await review(bus)).error is None
    assert (await review(bus)).error is None

    [instance] = await agent_instances(bus)
    assert (instance.name, instance.version, instance.subject) == ("critic", "1.2.3", settings.subjects.agent("critic"))
    assert (instance.consumes, instance.produces) == (["answer"], ["review"])
    assert (instance.cost_usd, instance.latency_s, instance.success_rate) == (0.002, 1.5, 0.9)
    stats = instance.stats
    assert (stats.served, stats.succeeded, stats.in_flight) == (2, 2, 0)
    assert stats.cost_usd == pytest.approx(0.008) and stats.busy_s > 0
    live = await live_agent(bus, "critic")
    assert live is not None and live.id == instance.id

    await app.stop()
    started = time.monotonic()
    assert await live_agent(bus, "critic") is None
    assert time.monotonic() - started < 0.5  # nobody serves the name: no responders, no time-out


@pytest.mark.infra
async def test_cli_agents_lists_the_live_agents_as_json_and_as_a_table(settings, bus, start_agent, router_peers):
    await router_peers(settings, lambda step: result(step, "Looks right.", cost_usd=0.004))
    cli = click.Group(commands={"agents": agents})
    env = {"NATS_URL": settings.nats_url, "FRUGALMESH_SUBJECT_PREFIX": settings.subject_prefix}

    def invoke(*args: str) -> str:
        outcome = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        assert outcome.exit_code == 0, outcome.output
        return outcome.output

    # click runs asyncio.run, so the command goes to a worker thread, away from the test's loop.
    assert "no live agents" in await asyncio.to_thread(invoke, "agents")
    await start_agent(critic, settings)
    await start_agent(critic, settings)
    await review(bus)  # no artifact store: the put fails, so the request counts as failed

    [listed] = msgspec.json.decode(await asyncio.to_thread(invoke, "agents", "--json"), type=list[AgentListing])

    assert (listed.name, len(listed.instances), {i["version"] for i in listed.instances}) == ("critic", 2, {"1.2.3"})
    assert (listed.consumes, listed.produces) == (["answer"], ["review"])
    assert (listed.served, listed.failed, listed.in_flight) == (1, 1, 0)
    assert listed.mean_cost_usd == pytest.approx(0.004) and listed.mean_latency_s is not None
    assert listed.declared == {"cost_usd": 0.002, "latency_s": 1.5, "success_rate": 0.9}
    table = await asyncio.to_thread(invoke, "agents")
    assert "critic" in table and "cost_usd=0.002" in table


@pytest.mark.unit
@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("frugalmesh.agents.shipped.debate", "is not MODULE:ATTRIBUTE"),
        ("no_such_module_anywhere:agent", "cannot import 'no_such_module_anywhere'"),
        ("frugalmesh.agents.shipped.debate:nope", "has no attribute 'nope'; its agents: agent"),
        ("frugalmesh.agents.shipped.debate:MAX_DEBATERS", "is a int, not a frugalmesh.agents.Agent"),
    ],
)
def test_agent_run_says_what_is_wrong_with_its_target(target, says):
    outcome = CliRunner().invoke(click.Group(commands={"agent": agent_group}), ["agent", "run", target])
    assert outcome.exit_code == 2 and says in " ".join(outcome.output.split()), outcome.output


@pytest.mark.infra
async def test_agent_run_serves_an_agent_from_the_folder_it_runs_in(settings, bus, tmp_path):
    (tmp_path / "hello_agent.py").write_text(
        "from frugalmesh.agents import Agent\n\n"
        'agent = Agent("hello", version="1.0.0")\n\n\n'
        "@agent.handler\n"
        "async def hello(ctx):\n"
        "    return None\n"
    )
    ready = tmp_path / "ready"
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "FRUGALMESH_SUBJECT_PREFIX": settings.subject_prefix,
        "PYTHONPATH": str(REPO),
    }
    command = ["agent", "run", "hello_agent:agent", "--ready-file", str(ready)]
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", *command],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await eventually(lambda: ready.exists() or process.poll() is not None, 30)
        assert ready.exists(), "the agent exited before it was ready"
        request = AgentRequest(task_id="t1", step_id="s", agent="hello", artifact="answer", deadline_ms=now_ms() + 5000)
        reply = await bus.request(settings.subjects.agent("hello"), request, AgentResult, 5)
        assert reply == AgentResult()
        assert await live_agent(bus, "hello") is not None
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0].decode()
    assert process.returncode == 0, output
