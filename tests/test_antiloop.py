"""Layer 2, anti-loop: attempts per task fingerprint per UTC day, bounded retries and loops, identical calls.

The router is the test peer of tests/fakes/router_peer.py, answering every call at a fixed cost, so each
test can count exactly what a loop managed to spend before it was stopped.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from fakes.router_peer import result
from helpers import deploy_with, new_task
from mesh_client import submit, wait_for_ack

from schemas.messages import ErrorInfo, Task
from services.planner.antiloop import fingerprint
from services.planner.config import Limits

COST = 0.01

RUNAWAY = """
name = "runaway"
description = "A step that keeps asking to be run again."

[[steps]]
id = "work"
role = "answer"
artifact = "answer"
retry_if = "RETRY"
max_loops = {max_loops}
messages = [{{ role = "user", content = "{{goal}}" }}]
"""

IDENTICAL = """
name = "identical"
description = "Three independent steps that send the very same call."
"""
IDENTICAL += "".join(
    f'[[steps]]\nid = "{s}"\nrole = "answer"\nartifact = "text"\n'
    'messages = [{ role = "user", content = "{goal}" }]\n'
    for s in ("a", "b", "c")
)


def kinds(events) -> list[str]:
    return [e.kind for e in events]


@pytest.mark.infra
async def test_the_fourth_attempt_of_the_same_task_is_refused_before_any_call(settings, nc, planner_mesh, router_peers):
    await planner_mesh(limits=Limits(attempts_per_day=3))
    peer = await router_peers(settings, lambda r: result(r, "ok"))
    runs = [await submit(nc, settings, new_task(goal="same goal", tenant="acme")) for _ in range(4)]

    assert [run[-1].kind for run in runs] == ["done", "done", "done", "failed"]
    assert kinds(runs[3]) == ["accepted", "refused", "failed"]
    reason = runs[3][1].detail
    assert reason.startswith("layer 2 (anti-loop): this task") and "already ran 3 times today" in reason
    assert "the limit is 3 attempts per day" in reason
    assert len(peer.requests) == 3
    # Another goal, or the same goal for another tenant, is other work.
    assert (await submit(nc, settings, new_task(goal="another goal", tenant="acme")))[-1].kind == "done"
    assert (await submit(nc, settings, new_task(goal="same goal", tenant="other")))[-1].kind == "done"
    await wait_for_ack(nc, settings)


@pytest.mark.unit
def test_fingerprint_is_the_work_not_the_task_id():
    a = Task(id="one", tenant="t", workflow="answer", goal="g")
    assert fingerprint(a) == fingerprint(Task(id="two", tenant="t", workflow="answer", goal="g", budget_usd=1.0))
    for other in (
        Task(id="x", tenant="u", workflow="answer", goal="g"),
        Task(id="x", tenant="t", workflow="draft-review", goal="g"),
        Task(id="x", tenant="t", workflow="answer", goal="h"),
    ):
        assert fingerprint(other) != fingerprint(a)
    assert fingerprint(a, schedule_run="s1-100") != fingerprint(a, schedule_run="s1-400")


@pytest.mark.infra
async def test_concurrent_replicas_let_exactly_the_limit_through(
    settings, nc, planner_mesh, start_service, router_peers
):
    used = await planner_mesh(limits=Limits(attempts_per_day=3))
    await start_service("planner", used, limits=Limits(attempts_per_day=3))
    peer = await router_peers(settings, lambda r: result(r, "ok"), delay_s=0.05)
    runs = await asyncio.gather(*(submit(nc, settings, new_task(goal="burst")) for _ in range(6)))

    assert sorted(run[-1].kind for run in runs) == ["done"] * 3 + ["failed"] * 3
    assert sum("planned" in kinds(run) for run in runs) == 3
    assert len(peer.requests) == 3
    await wait_for_ack(nc, settings)


@pytest.mark.infra
async def test_attempts_are_counted_per_utc_day(settings, nc, planner_mesh, router_peers):
    now = [datetime(2031, 3, 1, 23, 59, tzinfo=UTC)]
    await planner_mesh(limits=Limits(attempts_per_day=1), clock=lambda: now[0])
    await router_peers(settings, lambda r: result(r, "ok"))
    assert (await submit(nc, settings, new_task(goal="daily")))[-1].kind == "done"
    assert kinds(await submit(nc, settings, new_task(goal="daily"))) == ["accepted", "refused", "failed"]
    now[0] += timedelta(minutes=2)  # the next UTC day
    assert (await submit(nc, settings, new_task(goal="daily")))[-1].kind == "done"


@pytest.mark.infra
async def test_runaway_workflow_is_stopped_by_layer_2_with_its_cost_bounded(
    settings, nc, planner_mesh, router_peers, tmp_path
):
    """(d): a step that always asks for a retry, resubmitted again and again."""
    limits = Limits(attempts_per_day=3, step_attempts=2, identical_calls=2, max_loops=50)
    used = await planner_mesh(deploy_with(tmp_path, runaway=RUNAWAY.format(max_loops=50)), limits=limits)
    peer = await router_peers(used, lambda r: result(r, "Not good enough, RETRY.", cost_usd=COST))

    runs = [await submit(nc, used, new_task(workflow="runaway", goal="polish this")) for _ in range(5)]

    for run in runs[:3]:
        # Each run loops until the same call would go out a third time.
        assert kinds(run)[-2:] == ["refused", "failed"]
        assert run[-2].detail.startswith("step 'work': layer 2 (anti-loop): the same call")
        assert "would be sent 3 times in this task; the limit is 2" in run[-2].detail
        assert (run[-1].calls, run[-1].cost_usd) == (2, pytest.approx(2 * COST))
    for run in runs[3:]:
        assert kinds(run) == ["accepted", "refused", "failed"] and "layer 2 (anti-loop)" in run[1].detail
    # Bounded by the limits, not by the loop: attempts x identical calls, at the per-call cost.
    calls = limits.attempts_per_day * limits.identical_calls
    assert len(peer.requests) == calls == 6
    assert sum(run[-1].cost_usd for run in runs) == pytest.approx(calls * COST)
    await wait_for_ack(nc, used)


@pytest.mark.infra
async def test_a_loop_stops_at_max_loops_and_a_loop_that_settles_is_done(
    settings, nc, planner_mesh, router_peers, tmp_path
):
    # identical_calls is high here, so the loop bound is what stops it.
    limits = Limits(identical_calls=10, max_loops=5)
    used = await planner_mesh(deploy_with(tmp_path, runaway=RUNAWAY.format(max_loops=2)), limits=limits)

    def respond(request):
        settles = request.messages[0].content == "settles" and request.attempt == 2
        return result(request, "Final answer." if settles else "RETRY", cost_usd=COST)

    peer = await router_peers(used, respond)
    stopped = await submit(nc, used, new_task(workflow="runaway", goal="never settles"))
    assert kinds(stopped)[-2:] == ["refused", "failed"] and stopped[-1].calls == 3  # 1 + 2 loops
    assert "still matches retry_if 'RETRY' after 2 loops" in stopped[-1].detail

    settled = await submit(nc, used, new_task(workflow="runaway", goal="settles"))
    assert settled[-1].kind == "done" and settled[-1].calls == 2
    assert [r.attempt for r in peer.requests if r.messages[0].content == "settles"] == [1, 2]


@pytest.mark.infra
async def test_identical_calls_inside_one_task_are_stopped(settings, nc, planner_mesh, router_peers, tmp_path):
    used = await planner_mesh(deploy_with(tmp_path, identical=IDENTICAL), limits=Limits(identical_calls=2))
    peer = await router_peers(used, lambda r: result(r, "same", cost_usd=COST))
    events = await submit(nc, used, new_task(workflow="identical", goal="g"))
    assert kinds(events)[-2:] == ["refused", "partial"]
    assert "the same call (role 'answer', same messages)" in events[-1].detail
    assert len(peer.requests) == 2


@pytest.mark.infra
async def test_retries_per_step_are_bounded_by_the_limit(settings, nc, planner_mesh, router_peers):
    await planner_mesh(limits=Limits(step_attempts=3, identical_calls=3))
    busy = ErrorInfo(kind="unavailable", message="busy", retryable=True)
    peer = await router_peers(settings, lambda r: result(r, "", cost_usd=0.0, error=busy))
    events = await submit(nc, settings, new_task(goal="q"))
    assert events[-1].kind == "failed" and events[-1].calls == 3
    assert [r.attempt for r in peer.requests] == [1, 2, 3]
