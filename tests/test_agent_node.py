"""An agent service nobody here wrote in Python: examples/agents/calc/agent.mjs, a Node.js calculator
built on the ``nats`` npm package and the JSON Schemas only (docs/agents.md's worked example), run as
a subprocess against the real planner and artifact store; the router is a test peer.

The agent's package is installed into examples/agents/calc/node_modules from its lock file
(``npm ci``) once, when missing or older than the lock file; without Node.js and npm on the machine
the tests fail, saying what to install."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from fakes.router_peer import result
from helpers import deploy_with, eventually, new_task
from mesh_client import artifact, put_artifact, stream_messages, submit

from schemas.messages import AgentRequest, AgentResult, Artifact, ArtifactRef, DeadLetter, Rejection
from schemas.subjects import SRV_INFO, STREAM_DLQ, service_subject
from services.runtime.agents import live_agent
from services.runtime.bus import now_ms

pytestmark = pytest.mark.infra

CALC_DIR = Path(__file__).resolve().parents[1] / "examples" / "agents" / "calc"
NAME = "calc"

CALC_WORKFLOW = r'''
name = "calc"
description = "A model writes the arithmetic as one expression; the calc agent evaluates it."

[[steps]]
id = "expression"
role = "answer"
artifact = "text"
max_tokens = 64
messages = [
  { role = "user", content = "{goal}" },
  { role = "system", content = """Write the arithmetic that answers the question above as one expression: \
numbers, + - * / ^ and parentheses only. Do not compute it.""" },
]

[[steps]]
id = "answer"
kind = "agent"
agent = "calc"
needs = ["expression"]
artifact = "answer"
timeout_s = 10
'''

GOAL = "A farmer has 12 cows and buys 5 more. How many cows?"


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with the agent's npm package installed from its lock file."""
    found = shutil.which("node")
    if found is None or shutil.which("npm") is None:
        # The worked example of docs/agents.md must run: without Node.js this check would silently not happen.
        pytest.fail(
            "Node.js and npm are needed for the Node.js agent test: install them (`apt-get install nodejs npm`)"
        )
    installed = CALC_DIR / "node_modules" / ".package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < (CALC_DIR / "package-lock.json").stat().st_mtime:
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=CALC_DIR, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"npm ci in {CALC_DIR} exited {done.returncode}: {done.stderr[-2000:]}"
    return found


class CalcAgent:
    """``node agent.mjs`` on this test's NATS server and prefix; its output goes to a log file."""

    def __init__(self, node: str, settings, log: Path) -> None:
        self.node, self.settings, self.log = node, settings, log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, bus) -> CalcAgent:
        env = {
            **os.environ,
            "FRUGALMESH_NATS_URL": self.settings.nats_url,
            "FRUGALMESH_SUBJECT_PREFIX": self.settings.subjects.prefix,
            "AGENT_NAME": NAME,
        }
        with self.log.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                self.node, "agent.mjs", cwd=CALC_DIR, env=env, stdout=out, stderr=subprocess.STDOUT
            )

        async def registered():
            assert self.process.returncode is None, f"the agent exited {self.process.returncode}: {self.output()}"
            return await live_agent(bus, NAME, timeout_s=0.5)

        await eventually(registered, timeout_s=20, interval_s=0.1, message=lambda: f"never registered: {self.output()}")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    async def stop(self) -> int:
        """SIGTERM, and its exit status once it has drained."""
        if self.process.returncode is None:
            self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), 10)


@pytest.fixture
async def calc(node, settings, bus, tmp_path):
    agent = await CalcAgent(node, settings, tmp_path / "calc.log").start(bus)
    yield agent
    if agent.process.returncode is None:
        agent.process.kill()
        await agent.process.wait()


async def test_a_task_hands_the_models_arithmetic_to_the_node_agent(
    settings, nc, planner_mesh, router_peers, calc, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, calc=CALC_WORKFLOW))
    peer = await router_peers(used, lambda r: result(r, "The expression is 12 + 5."))
    task = new_task(workflow="calc", goal=GOAL, tenant="acme", deadline_s=15)

    events = await submit(nc, used, task, timeout_s=15)

    steps = ["step_started", "step_done"] * 2
    assert [e.kind for e in events] == ["accepted", "planned", *steps, "done"], events
    assert len(peer.requests) == 1 and peer.requests[0].messages[0].content == GOAL
    expression = events[3].artifact
    final = await artifact(nc, used, events[-1].artifact.id, "acme")
    assert final.type == "answer" and final.body["text"] == "17" and final.body["model"] == NAME
    assert final.parents == [expression.id]
    assert (final.task_id, final.step_id) == (task.id, "answer")
    assert (final.cost_usd, final.calls) == (0.0, [])


async def test_an_expression_it_cannot_parse_fails_the_step_invalid(
    settings, nc, planner_mesh, router_peers, calc, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, calc=CALC_WORKFLOW))
    await router_peers(used, lambda r: result(r, "twelve cows plus five cows"))
    task = new_task(workflow="calc", goal=GOAL, tenant="acme", deadline_s=15)

    events = await submit(nc, used, task, timeout_s=15)

    last = events[-1]
    assert last.kind in ("partial", "failed"), events
    assert "calc" in last.detail and "invalid" in last.detail and "no arithmetic expression" in last.detail, last.detail
    # Not retried: an input it cannot read is the same input the next time.
    assert [e.kind for e in events].count("step_started") == 2
    if last.kind == "partial":
        assert last.artifact is not None and last.artifact.type == "text"


async def test_garbage_gets_a_rejection_and_a_dead_letter_and_the_agent_serves_on(
    settings, nc, bus, start_service, calc
):
    await start_service("artifact-store", settings)
    subject = settings.subjects.agent(NAME)

    for garbage in (b"\xff\x00 not json", b"[1, 2]", b'{"task_id": "t"}'):
        reply = await nc.request(subject, garbage, timeout=5)
        rejection = msgspec.json.decode(reply.data, type=Rejection)
        assert rejection.error.kind == "invalid" and rejection.error.retryable is False

    async def dead_letters():
        letters = [msgspec.json.decode(d, type=DeadLetter) for d in await stream_messages(nc, settings, STREAM_DLQ)]
        return letters if len(letters) == 3 else None

    letters = await eventually(dead_letters, timeout_s=5)
    assert letters[0].data == b"\xff\x00 not json"
    assert all(letter.service == f"agent-{NAME}" and letter.subject == subject for letter in letters)
    assert "AgentRequest without step_id" in letters[2].error

    stored = await put_artifact(nc, settings, Artifact(type="text", body={"text": "(3 + 4) * 2^2 - 0.5"}))
    request = AgentRequest(
        task_id="task-1",
        step_id="calc",
        agent=NAME,
        artifact="answer",
        deadline_ms=now_ms() + 5000,
        needs={"expression": stored.ref},
    )
    reply = await nc.request(subject, msgspec.json.encode(request), timeout=5)
    answer = msgspec.json.decode(reply.data, type=AgentResult)
    assert answer.error is None and len(answer.artifacts) == 1, answer
    made = await artifact(nc, settings, answer.artifacts[0].id)
    assert made.body["text"] == "27.5" and made.parents == [stored.ref.id]

    # A step asking for a type it does not produce, with no input, with an input that does not exist
    # or with another tenant's: invalid, and not retryable (the next try would get the same request).
    for wrong in (
        msgspec.structs.replace(request, artifact="review"),
        msgspec.structs.replace(request, needs={}),
        msgspec.structs.replace(request, needs={"x": ArtifactRef(id="0" * 64, type="text")}),
        msgspec.structs.replace(request, tenant="globex"),
    ):
        reply = await nc.request(subject, msgspec.json.encode(wrong), timeout=5)
        failed = msgspec.json.decode(reply.data, type=AgentResult)
        assert failed.error is not None and failed.artifacts == [], failed
        assert (failed.error.kind, failed.error.retryable) == ("invalid", False), failed

    # What it measured, as the mesh reads it: the five requests it served, one answered (rejections not counted).
    stats = (await live_agent(bus, NAME)).stats
    assert (stats.served, stats.succeeded, stats.in_flight, stats.cost_usd) == (5, 1, 0, 0.0)
    assert stats.busy_s > 0


async def test_it_registers_as_a_micro_service_and_leaves_on_sigterm(settings, nc, bus, planner_mesh, calc, tmp_path):
    # Another test's calc may share the server: ask this prefix's instance by its id.
    instance = await live_agent(bus, NAME)
    reply = await nc.request(service_subject(SRV_INFO, NAME, instance.id), b"", timeout=2)
    info = json.loads(reply.data)
    assert info["name"] == NAME and info["version"] == "1.0.0"
    metadata = info["metadata"]
    assert metadata["frugalmesh_prefix"] == settings.subjects.prefix
    assert metadata["consumes"].split(",") == ["text", "answer"] and metadata["produces"] == "answer"
    [endpoint] = info["endpoints"]
    assert endpoint["subject"] == settings.subjects.agent(NAME) and endpoint["queue_group"] == NAME

    assert (instance.consumes, instance.produces, instance.cost_usd) == (["text", "answer"], ["answer"], 0.0)

    assert await calc.stop() == 0, calc.output()
    assert await live_agent(bus, NAME) is None
    # Gone from the registry, so a task that needs it is refused before any call.
    used = await planner_mesh(deploy_with(tmp_path, calc=CALC_WORKFLOW))
    events = await submit(nc, used, new_task(workflow="calc", goal=GOAL, deadline_s=15))
    assert [e.kind for e in events] == ["accepted", "refused", "failed"], events
    assert "agent 'calc'" in events[1].detail and "no live instance" in events[1].detail
