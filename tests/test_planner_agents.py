"""Agent steps (``kind = "agent"``) in the real planner, against a real nats-server and artifact store.

The agent is ``AgentTestPeer`` (tests/fakes/agent_peer.py): plain nats-py registered through NATS's
own service framework as any agent in any language is, answering what each test decides; the router
is ``RouterTestPeer``. The Python SDK and the Node.js agent have their own tests.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes.agent_peer import AgentTestPeer
from fakes.router_peer import result
from helpers import deploy_with, new_task
from mesh_client import artifact, put_artifact, submit, wait_for_ack

from schemas.messages import AgentRequest, AgentResult, Artifact, ArtifactRef, ErrorInfo
from schemas.subjects import HEADER_BUDGET, HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT
from services.planner.workflow import WorkflowError, parse_workflow

SOLVE = """
name = "solve"

[[steps]]
id = "expression"
role = "answer"
artifact = "text"
messages = [{ role = "user", content = "{goal}" }, { role = "user", content = "Write it as one expression." }]

[[steps]]
id = "compute"
kind = "agent"
agent = "calc"
needs = ["expression"]
artifact = "answer"
params = { precision = 2 }
retries = RETRIES
timeout_s = TIMEOUT
allow_models = ["mixtral-8x7b-local"]
"""

EACH = """
name = "each"

[[steps]]
id = "each"
kind = "agent"
agent = "calc"
for_each = "inputs"
artifact = "answer"
"""


def solve(retries: int = 0, timeout_s: float = 5) -> str:
    return SOLVE.replace("RETRIES", str(retries)).replace("TIMEOUT", str(timeout_s))


def kinds(events) -> list[str]:
    return [e.kind for e in events]


async def compute(peer: AgentTestPeer, request: AgentRequest) -> AgentResult:
    """A calculator: the answer to the expression its need holds."""
    expression = await artifact(peer.nc, _Settings(peer), request.needs["expression"].id, request.tenant)
    left, right = expression.body["text"].split("+")
    ref = await peer.put(request, "answer", {"text": str(int(left) + int(right))}, parents=[expression.id])
    return AgentResult(artifacts=[ref], cost_usd=0.003, calls=["c1", "c2"])


class _Settings:
    """What mesh_client needs of settings, from a peer."""

    def __init__(self, peer: AgentTestPeer) -> None:
        self.subjects = peer.subjects


@pytest.fixture
async def agent_peers(nc):
    started: list[AgentTestPeer] = []

    async def start(settings, respond, name: str = "calc", figures: tuple | None = None) -> AgentTestPeer:
        peer = await AgentTestPeer(nc, settings, name, respond, figures).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        await peer.stop()


@pytest.mark.infra
async def test_an_agent_step_gets_its_needs_params_budget_and_deadline_and_its_artifact_is_the_answer(
    settings, nc, planner_mesh, router_peers, agent_peers, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, solve=solve()))
    await router_peers(used, lambda r: result(r, "12 + 5", cost_usd=0.001))
    agent = await agent_peers(used, compute)
    task = new_task(workflow="solve", goal="12 cows and 5 more?", tenant="acme", budget_usd=0.5, deadline_s=10)

    events = await submit(nc, used, task)

    assert kinds(events) == ["accepted", "planned", "step_started", "step_done", "step_started", "step_done", "done"]
    assert [e.agent for e in events[4:6]] == ["calc", "calc"] and events[2].agent == ""
    # The terminal event names the agent that made the answer, and carries the run's history.
    assert events[-1].agent == "calc" and [e.kind for e in events[-1].history] == kinds(events)[:-1]
    answer = await artifact(nc, used, events[-1].artifact.id, "acme")
    assert answer.type == "answer" and answer.body["text"] == "17" and answer.step_id == "compute"
    # The agent's own account of its calls joins the task's totals.
    assert events[-1].calls == 3 and events[-1].cost_usd == pytest.approx(0.004)

    request = agent.requests[0]
    assert (request.task_id, request.step_id, request.tenant, request.agent) == (task.id, "compute", "acme", "calc")
    assert request.goal == task.goal and request.params == {"precision": 2} and request.artifact == "answer"
    assert list(request.needs) == ["expression"] and request.inputs == []
    assert request.task_budget_usd == 0.5 and request.budget_left_usd == pytest.approx(0.499)
    assert request.allow_models == ["mixtral-8x7b-local"] and request.attempt == 1
    assert request.deadline_ms <= task.submitted_ms + 10_000
    headers = agent.headers[0]
    assert (headers[HEADER_TASK], headers[HEADER_TENANT], headers[HEADER_BUDGET]) == (task.id, "acme", "0.5")
    assert headers[HEADER_DEADLINE] == str(request.deadline_ms)
    await wait_for_ack(nc, used)


@pytest.mark.infra
async def test_a_task_needing_an_agent_nobody_runs_is_refused_at_once_naming_it(
    settings, nc, planner_mesh, router_peers, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, solve=solve()))
    router = await router_peers(used, lambda r: result(r, "12 + 5"))

    started = time.monotonic()
    events = await submit(nc, used, new_task(workflow="solve", goal="12 + 5?"))

    assert kinds(events) == ["accepted", "refused", "failed"]
    assert "agent 'calc' has no live instance" in events[1].detail and "frugalmesh agent run" in events[1].detail
    assert time.monotonic() - started < 2.0  # no time-out waited for
    assert router.requests == []  # nothing was spent


@pytest.mark.infra
async def test_a_silent_instance_is_retried_on_another_and_a_silent_agent_ends_the_task_partial(
    settings, nc, planner_mesh, router_peers, agent_peers, tmp_path
):
    used = await planner_mesh(
        deploy_with(
            tmp_path,
            solve=solve(retries=5, timeout_s=0.5),
            once=solve(0, 0.5).replace('name = "solve"', 'name = "once"'),
        )
    )
    await router_peers(used, lambda r: result(r, "12 + 5"))

    async def silent(peer, request):
        return None

    quiet = await agent_peers(used, silent)
    events = await submit(nc, used, new_task(workflow="once", goal="12 + 5?"))
    # No answer by the step's deadline and no retry left: fail soft with the expression so far.
    assert kinds(events)[-1] == "partial" and events[-1].artifact.type == "text"
    assert "agent 'calc' did not answer within" in events[-1].detail

    # NATS picks a queue-group member at random: with two working instances beside the silent one
    # and six tries, all six land on the silent one once in 729 runs.
    working = [await agent_peers(used, compute) for _ in range(2)]
    events = await submit(nc, used, new_task(workflow="solve", goal="12 + 5?"), timeout_s=15)
    assert kinds(events)[-1] == "done"
    answered = [request for peer in working for request in peer.requests]
    tries = sorted(r.attempt for r in quiet.requests[1:] + answered)
    assert answered and tries == list(range(1, len(tries) + 1))


@pytest.mark.infra
@pytest.mark.parametrize("returned", ["wrong type", "not stored"])
async def test_an_artifact_that_does_not_fit_its_type_makes_the_step_invalid(
    settings, nc, planner_mesh, router_peers, agent_peers, tmp_path, returned
):
    used = await planner_mesh(deploy_with(tmp_path, solve=solve()))
    await router_peers(used, lambda r: result(r, "12 + 5"))

    async def wrong(peer, request):
        if returned == "wrong type":
            ref = await peer.put(request, "text", {"text": "17"})
            return AgentResult(artifacts=[ArtifactRef(id=ref.id, type="answer")])
        return AgentResult(artifacts=[ArtifactRef(id="0" * 64, type="answer")])

    await agent_peers(used, wrong)
    events = await submit(nc, used, new_task(workflow="solve", goal="12 + 5?"))

    assert kinds(events)[-1] == "partial" and events[-1].artifact.type == "text"
    assert "step 'compute': agent 'calc' produced no valid 'answer' artifact" in events[-1].detail


@pytest.mark.infra
async def test_an_agent_whose_calls_were_refused_ends_the_task_partial_with_its_best_artifact(
    settings, nc, planner_mesh, router_peers, agent_peers, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, solve=solve(retries=2)))
    await router_peers(used, lambda r: result(r, "12 + 5"))

    async def refused(peer, request):
        draft = await peer.put(request, "answer", {"text": "about 17"})
        error = ErrorInfo(kind="refused", message="task cap: $0.01 of $0.01 reserved")
        return AgentResult(artifacts=[draft], error=error, cost_usd=0.01, calls=["c1"])

    agent = await agent_peers(used, refused)
    events = await submit(nc, used, new_task(workflow="solve", goal="12 + 5?"))

    assert kinds(events)[-2:] == ["refused", "partial"] and len(agent.requests) == 1  # a refusal is not retried
    assert "agent 'calc': refused: task cap" in events[-1].detail
    best = await artifact(nc, used, events[-1].artifact.id)
    assert best.body["text"] == "about 17"


@pytest.mark.infra
async def test_an_agent_step_runs_once_per_input_under_the_fanout_cap(
    settings, nc, planner_mesh, agent_peers, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, each=EACH), max_fanout=2)
    in_flight = [0, 0]

    async def slow(peer, request):
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await asyncio.sleep(0.2)
        in_flight[0] -= 1
        (item,) = request.inputs
        ref = await peer.put(request, "answer", {"text": f"done {item.id[:6]}"}, parents=[item.id])
        return AgentResult(artifacts=[ref])

    agent = await agent_peers(used, slow)
    refs = [(await put_artifact(nc, used, Artifact(type="text", body={"text": f"{n} + 1"}))).ref for n in range(3)]
    events = await submit(nc, used, new_task(workflow="each", goal="add one", inputs=refs))

    assert kinds(events)[-1] == "done" and events[-1].artifact.type == "batch"
    assert sorted(r.step_id for r in agent.requests) == ["each[0]", "each[1]", "each[2]"]
    assert {r.inputs[0].id for r in agent.requests} == {r.id for r in refs}
    assert in_flight[1] == 2


@pytest.mark.infra
async def test_the_preflight_estimate_prices_an_agent_step_with_its_declared_figures(
    settings, nc, planner_mesh, router_peers, agent_peers, tmp_path
):
    used = await planner_mesh(deploy_with(tmp_path, solve=solve()))
    router = await router_peers(used, lambda r: result(r, "12 + 5"))
    await agent_peers(used, compute, figures=(0.75, 3.0, 0.9))

    events = await submit(nc, used, new_task(workflow="solve", goal="12 + 5?", budget_usd=0.5))

    assert kinds(events) == ["accepted", "refused", "failed"]
    # The model step's worst case (a fraction of a cent) plus the agent's declared $0.75 and 3 s.
    assert events[1].detail.startswith("pre-flight estimate: estimated cost $0.76")
    assert "exceeds the budget $0.5000" in events[1].detail
    assert router.requests == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("step", "problem"),
    [
        ('kind = "agent"\nagent = "calc.x"', "agent must name the agent service"),
        ('kind = "agent"\nagent = "calc"\nrole = "answer"', "an agent step sends no prompt of its own"),
        ('kind = "agent"\nagent = "calc"\nretries = 9', "retries must be 0 to 5"),
        ('kind = "agent"\nagent = "calc"\ntimeout_s = 0', "timeout_s must be above 0"),
        ('role = "answer"\nagent = "calc"\nmessages = [{ role = "user", content = "{goal}" }]', "are for agent steps"),
    ],
)
def test_a_bad_agent_step_stops_the_workflow_at_load_saying_why(step, problem):
    text = f'name = "w"\n[[steps]]\nid = "s"\nartifact = "answer"\n{step}\n'
    with pytest.raises(WorkflowError, match=problem):
        parse_workflow(text)
