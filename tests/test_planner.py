"""The planner against a real nats-server and the real artifact store.

The router is played by ``RouterTestPeer`` (tests/fakes/router_peer.py, the ``router_peers``
fixture): a plain nats-py subscriber on ``step_request`` that replies InferenceResult JSON, so each
test decides what the "model" answers, how slowly, or how it fails.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from fakes.router_peer import Responder, RouterTestPeer, result
from helpers import deploy_with, new_task
from mesh_client import artifact, submit, wait_for_ack
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig

from schemas.messages import (
    DeadLetter,
    ErrorInfo,
    InferenceResult,
    StepRequest,
)
from schemas.subjects import (
    DURABLE_PLANNER,
    HEADER_BUDGET,
    HEADER_DEADLINE,
    HEADER_TASK,
    HEADER_TENANT,
    STREAM_DLQ,
    STREAM_TASKS,
)

pytestmark = pytest.mark.infra


async def test_answer_task_events_from_accepted_to_done(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    peer = await router_peers(settings, lambda r: result(r, "The answer is 4.", cost_usd=0.002, graded=True))
    task = new_task(
        workflow="answer", goal="What is 2+2?", tenant="acme", deadline_s=5, allow_models=["mixtral-8x7b-local"]
    )

    events = await submit(nc, settings, task)

    assert [e.kind for e in events] == ["accepted", "planned", "step_started", "step_done", "done"]
    assert events[1].detail == "answer"
    assert all(e.task_id == task.id and e.tenant == "acme" and e.workflow == "answer" for e in events)
    done = events[-1]
    assert done.artifact == events[3].artifact and done.artifact.type == "answer"
    assert (done.calls, done.cost_usd) == (1, 0.002)

    stored = await artifact(nc, settings, done.artifact.id, "acme")
    assert stored.body == {"text": "The answer is 4.", "model": "mixtral-8x7b-local", "graded": True}
    assert stored.task_id == task.id and stored.step_id == "answer"
    assert len(stored.calls) == 1 and stored.calls[0].startswith("answer-1-")
    assert stored.cost_usd == 0.002 and stored.parents == []

    request = peer.requests[0]
    assert request.messages[0].content == "What is 2+2?" and request.role == "answer"
    assert request.allow_models == ["mixtral-8x7b-local"] and request.tenant == "acme"
    assert request.deadline_ms == task.submitted_ms + 5000
    headers = peer.headers[0]
    assert headers[HEADER_DEADLINE] == str(request.deadline_ms)
    assert (headers[HEADER_TASK], headers[HEADER_TENANT]) == (task.id, "acme")
    await wait_for_ack(nc, settings)


async def test_without_live_progress_only_the_terminal_event_is_sent_with_every_event_in_its_history(
    settings, nc, planner_mesh, router_peers
):
    await planner_mesh()
    await router_peers(settings, lambda r: result(r, "4", cost_usd=0.002, graded=True))
    task = msgspec.structs.replace(new_task(workflow="answer", goal="What is 2+2?", deadline_s=5), live_progress=False)

    events = await submit(nc, settings, task)

    assert [e.kind for e in events] == ["done"]
    assert [e.kind for e in events[0].history] == ["accepted", "planned", "step_started", "step_done"]
    assert events[0].history[-1].artifact == events[0].artifact


def reviewer(verdict_text: str) -> Responder:
    def respond(request: StepRequest) -> InferenceResult:
        if request.step_id == "draft":
            return result(request, "draft: 5", graded=False)
        return result(request, verdict_text, cost_usd=0.01, graded=True)

    return respond


async def test_draft_review_stores_draft_review_and_final_with_lineage(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    peer = await router_peers(settings, reviewer("It is 4."))
    task = new_task(workflow="draft-review", goal="What is 2+2?")

    events = await submit(nc, settings, task)

    assert [e.kind for e in events] == [
        "accepted",
        "planned",
        "step_started",
        "step_done",  # draft
        "step_started",
        "step_done",  # review
        "step_started",
        "step_done",  # final
        "done",
    ]
    assert events[1].detail == "draft,review,final"
    refs = {e.step_id: e.artifact for e in events if e.kind == "step_done"}
    draft, review, final = [await artifact(nc, settings, refs[s].id) for s in ("draft", "review", "final")]
    assert draft.body == {"text": "draft: 5", "model": "mixtral-8x7b-local", "graded": False}
    assert review.body == {"text": "It is 4.", "model": "mixtral-8x7b-local", "verdict": "revise", "graded": True}
    assert review.parents == [draft.id]
    # The review rejected the draft: the final answer is its correction, made from both.
    assert final.type == "answer" and final.body == {"text": "It is 4.", "model": "mixtral-8x7b-local", "graded": True}
    assert final.parents == [draft.id, review.id] and final.calls == [] and final.cost_usd == 0.0
    assert events[-1].artifact.id == final.id
    assert (events[-1].calls, round(events[-1].cost_usd, 6)) == (2, 0.011)

    # The review sees the goal first (replay keys on it), then the draft.
    review_request = next(r for r in peer.requests if r.step_id == "review")
    assert [(m.role, m.content) for m in review_request.messages[1:3]] == [
        ("user", "What is 2+2?"),
        ("assistant", "draft: 5"),
    ]


async def test_draft_review_keeps_an_accepted_draft(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    await router_peers(settings, reviewer("ACCEPT"))
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="What is 2+2?"))
    refs = {e.step_id: e.artifact for e in events if e.kind == "step_done"}
    assert events[-1].kind == "done"
    assert refs["final"] == refs["draft"] == events[-1].artifact
    assert (await artifact(nc, settings, refs["review"].id)).body["verdict"] == "accept"


FANOUT = """
name = "fanout"
max_fanout = {workflow_cap}
{steps}
[[steps]]
id = "join"
role = "answer"
artifact = "answer"
needs = [{needs}]
messages = [{{ role = "user", content = "{{goal}}" }}, {{ role = "user", content = "{{s0}} {{s11}}" }}]
"""


def fanout_deploy(tmp_path: Path, workflow_cap: int) -> Path:
    ids = [f"s{i}" for i in range(12)]
    # Distinct prompts: twelve identical calls in one task would be stopped as a loop.
    steps = "".join(
        f'[[steps]]\nid = "{i}"\nrole = "x"\nartifact = "text"\n'
        f'messages = [{{ role = "system", content = "part {i}" }}, {{ role = "user", content = "{{goal}}" }}]\n'
        for i in ids
    )
    text = FANOUT.format(workflow_cap=workflow_cap, steps=steps, needs=", ".join(f'"{i}"' for i in ids))
    return deploy_with(tmp_path, fanout=text)


@pytest.mark.parametrize(("planner_cap", "workflow_cap", "expected"), [(4, 9, 4), (9, 3, 3)])
async def test_independent_steps_run_in_parallel_up_to_the_cap(
    settings, nc, planner_mesh, router_peers, tmp_path, planner_cap, workflow_cap, expected
):
    used = await planner_mesh(fanout_deploy(tmp_path, workflow_cap), max_fanout=planner_cap)
    peer = await router_peers(used, lambda r: result(r, f"out of {r.step_id}"), delay_s=0.1)

    events = await submit(nc, used, new_task(workflow="fanout", goal="g"))

    assert events[-1].kind == "done" and events[-1].calls == 13
    assert peer.max_in_flight == expected
    join = next(r for r in peer.requests if r.step_id == "join")
    assert join.messages[1].content == "out of s0 out of s11"
    final = await artifact(nc, used, events[-1].artifact.id)
    assert len(final.parents) == 12


async def test_failed_review_ends_partial_with_the_draft(settings, nc, planner_mesh, router_peers):
    await planner_mesh()

    def respond(request: StepRequest) -> InferenceResult:
        if request.step_id == "draft":
            return result(request, "draft answer")
        return result(request, "", error=ErrorInfo(kind="provider", message="upstream 500"))

    await router_peers(settings, respond)
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="q"))

    terminal = events[-1]
    assert terminal.kind == "partial"
    assert "step 'review'" in terminal.detail and "upstream 500" in terminal.detail
    draft_ref = next(e.artifact for e in events if e.kind == "step_done" and e.step_id == "draft")
    assert terminal.artifact == draft_ref
    assert [e.kind for e in events].count("step_started") == 2  # final never started
    await wait_for_ack(nc, settings)


async def test_failed_only_step_ends_failed_and_retryable_error_is_retried_once(
    settings, nc, planner_mesh, router_peers
):
    await planner_mesh()

    def respond(request: StepRequest) -> InferenceResult:
        goal = request.messages[0].content
        if goal == "flaky" and request.attempt == 2:
            return result(request, "recovered")
        return result(request, "", error=ErrorInfo(kind="unavailable", message="busy", retryable=True))

    peer = await router_peers(settings, respond)
    flaky, broken = await asyncio.gather(
        submit(nc, settings, new_task(goal="flaky")), submit(nc, settings, new_task(goal="broken"))
    )

    assert flaky[-1].kind == "done" and flaky[-1].calls == 2
    assert broken[-1].kind == "failed" and broken[-1].artifact is None
    assert "unavailable: busy" in broken[-1].detail and broken[-1].calls == 2
    assert sorted(r.attempt for r in peer.requests) == [1, 1, 2, 2]


async def test_router_rejection_fails_the_step_with_its_reason(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    rejection = msgspec.json.encode({"v": 1, "error": {"kind": "pinning", "message": "model not allowed"}})
    await router_peers(settings, lambda r: rejection)
    events = await submit(nc, settings, new_task(goal="q"))
    assert events[-1].kind == "failed"
    assert "pinning: model not allowed" in events[-1].detail
    assert events[-1].calls == 0  # refused before any inference call: nothing metered, nothing counted


async def test_killed_call_ends_the_task_killed(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    killed = ErrorInfo(kind="killed", message="global kill")
    await router_peers(settings, lambda r: result(r, "", cost_usd=0.0, error=killed))
    events = await submit(nc, settings, new_task(goal="q"))
    assert events[-1].kind == "killed" and "global kill" in events[-1].detail


async def test_deadline_cancels_the_task_and_records_a_timeout(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    await router_peers(settings, lambda r: None)  # a router that never answers
    started = time.monotonic()
    events = await submit(nc, settings, new_task(goal="q", deadline_s=1.0))
    assert events[-1].kind == "failed" and events[-1].detail.startswith("timeout: the deadline of 1s passed")
    assert "refused" not in [e.kind for e in events]
    assert time.monotonic() - started < 3
    # The call was sent and is in flight at the deadline: a real router meters it, so it counts.
    assert events[-1].calls == 1


async def test_spent_budget_stops_new_steps_and_ends_partial(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    # The plan fits $0.03 (about $0.021 at worst), but the draft alone costs more than the budget.
    peer = await router_peers(settings, lambda r: result(r, "pricey", cost_usd=0.05))
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="q", budget_usd=0.03))
    assert [e.kind for e in events][-2:] == ["refused", "partial"]
    assert events[-2].detail == events[-1].detail and "budget spent" in events[-1].detail
    assert events[-1].artifact.type == "answer" and len(peer.requests) == 1


def refuse_review(request: StepRequest) -> InferenceResult:
    if request.step_id == "draft":
        return result(request, "draft answer")
    refused = ErrorInfo(kind="refused", message="task cap: $0.02 left, call needs $0.03")
    return result(request, "", cost_usd=0.0, error=refused)


async def test_refused_reservation_ends_partial_with_the_draft(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    await router_peers(settings, refuse_review)
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="q"))

    refused, terminal = events[-2:]
    assert (refused.kind, terminal.kind) == ("refused", "partial")
    assert refused.detail == terminal.detail == "step 'review': refused: task cap: $0.02 left, call needs $0.03"
    draft_ref = next(e.artifact for e in events if e.kind == "step_done" and e.step_id == "draft")
    assert terminal.artifact == draft_ref
    assert [e.kind for e in events].count("step_started") == 2  # final never started
    await wait_for_ack(nc, settings)


async def test_refused_first_call_ends_failed_without_an_artifact(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    refused = ErrorInfo(kind="refused", message="tenant cap")
    await router_peers(settings, lambda r: result(r, "", cost_usd=0.0, error=refused))
    events = await submit(nc, settings, new_task(goal="q"))
    assert [e.kind for e in events][-2:] == ["refused", "failed"] and events[-1].artifact is None
    assert "refused: tenant cap" in events[-1].detail


async def test_budget_travels_in_a_header_and_max_tokens_overrides_every_step(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    peer = await router_peers(settings, reviewer("ACCEPT"))
    with_budget = new_task(workflow="draft-review", goal="q", budget_usd=0.5, max_tokens=64)
    assert (await submit(nc, settings, with_budget))[-1].kind == "done"
    assert [h[HEADER_BUDGET] for h in peer.headers] == ["0.5", "0.5"]
    assert [r.max_tokens for r in peer.requests] == [64, 64]

    assert (await submit(nc, settings, new_task(goal="q")))[-1].kind == "done"
    assert HEADER_BUDGET not in peer.headers[-1] and peer.requests[-1].max_tokens == 512


@pytest.mark.parametrize(
    ("limits", "why"),
    [({"budget_usd": 0.001}, "exceeds the budget $0.0010"), ({"deadline_s": 1.0}, "exceeds the deadline")],
)
async def test_a_plan_that_cannot_fit_is_refused_before_any_call(settings, nc, planner_mesh, router_peers, limits, why):
    await planner_mesh()
    peer = await router_peers(settings, reviewer("ACCEPT"))
    # draft-review: a local draft (0.4 s) then a frontier review (2.0 s), about $0.021 at worst.
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="What is 2+2?", **limits))
    assert [e.kind for e in events] == ["accepted", "refused", "failed"]
    assert events[1].detail == events[2].detail
    assert events[1].detail.startswith("pre-flight estimate: estimated") and why in events[1].detail
    assert "2.40 s critical path" in events[1].detail
    assert peer.requests == []
    await wait_for_ack(nc, settings)


async def test_a_call_that_would_overrun_the_budget_is_not_sent(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    # Spent $0.015 of $0.03 after the draft; the review may cost about $0.021: it must not start.
    peer = await router_peers(settings, lambda r: result(r, "draft", cost_usd=0.015))
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="q", budget_usd=0.03))
    assert [e.kind for e in events][-2:] == ["refused", "partial"]
    assert "budget would be exceeded" in events[-1].detail and "step 'review'" in events[-1].detail
    assert len(peer.requests) == 1 and events[-1].cost_usd == 0.015


async def test_a_call_that_would_overrun_the_deadline_is_not_sent(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    # The plan fits 3 s (0.4 + 2.0); the draft takes 1.6 s, leaving too little for a 2 s review.
    peer = await router_peers(settings, lambda r: result(r, "slow draft"), delay_s=1.6)
    events = await submit(nc, settings, new_task(workflow="draft-review", goal="q", deadline_s=3.0))
    assert [e.kind for e in events][-2:] == ["refused", "partial"]
    assert "deadline would be exceeded" in events[-1].detail
    assert len(peer.requests) == 1


async def test_a_planner_upgraded_over_the_old_untenanted_task_subject_takes_tasks_on_the_new_one(
    settings, nc, planner_mesh
):
    """A mesh whose TASKS stream and durable consumer an older version declared on `<prefix>.task.submit`
    (before the tenant token): the new planner moves both to `<prefix>.task.submit.*` and runs tasks."""
    js = nc.jetstream()
    stream = settings.subjects.stream(STREAM_TASKS)
    old = f"{settings.subject_prefix}.task.submit"
    await js.add_stream(StreamConfig(name=stream, subjects=[old], retention=RetentionPolicy.WORK_QUEUE))
    await js.add_consumer(stream, ConsumerConfig(durable_name=DURABLE_PLANNER, filter_subject=old))

    await planner_mesh()
    events = await submit(nc, settings, new_task(workflow="nope", goal="q"))

    assert [e.kind for e in events] == ["accepted", "failed"]
    assert (await js.consumer_info(stream, DURABLE_PLANNER)).config.filter_subject == settings.subjects.task_submit_all


async def test_unknown_workflow_fails_with_the_reason(settings, nc, planner_mesh):
    await planner_mesh()
    events = await submit(nc, settings, new_task(workflow="nope", goal="q"))
    assert [e.kind for e in events] == ["accepted", "failed"]
    assert "unknown workflow 'nope'" in events[-1].detail and "draft-review" in events[-1].detail
    await wait_for_ack(nc, settings)


async def test_invalid_task_is_dead_lettered_acked_and_work_goes_on(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    await router_peers(settings, lambda r: result(r, "fine"))
    js = nc.jetstream()
    dlq = await js.subscribe(settings.subjects.dlq("planner"), stream=settings.subjects.stream(STREAM_DLQ))
    await js.publish(settings.subjects.task_submit("default"), b'{"id": 42}')
    await js.publish(settings.subjects.task_submit("default"), msgspec.json.encode(new_task(tenant="a.b")))

    letters = [msgspec.json.decode((await dlq.next_msg(timeout=5)).data, type=DeadLetter) for _ in range(2)]
    await dlq.unsubscribe()
    assert "Task" in letters[0].error and letters[0].data == b'{"id": 42}'
    assert "subject token" in letters[1].error
    assert (await submit(nc, settings, new_task(goal="q")))[-1].kind == "done"
    await wait_for_ack(nc, settings)


async def test_many_tasks_run_concurrently(settings, nc, planner_mesh, router_peers):
    await planner_mesh(max_in_flight=64)
    peer = await router_peers(settings, lambda r: result(r, r.messages[0].content.upper()), delay_s=0.2)
    tasks = [new_task(goal=f"goal {i}") for i in range(60)]
    started = time.monotonic()
    runs = await asyncio.gather(*(submit(nc, settings, t) for t in tasks))
    # Sequentially this would take 60 x 0.2 s; concurrently it takes a few round trips.
    assert time.monotonic() - started < 6
    assert all(events[-1].kind == "done" for events in runs)
    assert peer.max_in_flight > 20
    await wait_for_ack(nc, settings)


async def test_replicas_share_the_work_queue_and_run_each_task_once(settings, nc, start_service, router_peers):
    await start_service("artifact-store", settings)
    await start_service("planner", settings)
    await start_service("planner", settings)
    peer = await router_peers(settings, lambda r: result(r, "ok"), delay_s=0.05)
    runs = await asyncio.gather(*(submit(nc, settings, new_task(goal=f"g{i}")) for i in range(20)))
    assert all([e.kind for e in events].count("accepted") == 1 and events[-1].kind == "done" for events in runs)
    assert len(peer.requests) == 20
    await wait_for_ack(nc, settings)


async def test_a_task_longer_than_ack_wait_is_not_redelivered(settings, nc, planner_mesh, router_peers):
    # in_progress every ack_wait/3 keeps the message ours while the task runs.
    await planner_mesh(ack_wait_s=0.6)
    peer = await router_peers(settings, lambda r: result(r, "slow"), delay_s=1.5)
    events = await submit(nc, settings, new_task(goal="q", deadline_s=5))
    assert [e.kind for e in events] == ["accepted", "planned", "step_started", "step_done", "done"]
    assert len(peer.requests) == 1
    await wait_for_ack(nc, settings)


async def test_no_router_fails_the_task_after_one_retry(settings, nc, planner_mesh):
    await planner_mesh()
    events = await submit(nc, settings, new_task(goal="q"))
    assert events[-1].kind == "failed" and "no router is answering" in events[-1].detail
    assert events[-1].calls == 0  # no router got either attempt


@pytest.mark.infra
@pytest.mark.slow
async def test_the_planner_takes_tasks_again_after_its_nats_server_restarts(settings, start_service, tmp_path):
    """The planner's open pull requests die with the server; its consumer asks again once the server
    has been silent for three heartbeats, so a task submitted after the restart still runs."""
    import socket

    import nats as nats_client

    from services.embedded.servers import EmbeddedNats

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = EmbeddedNats(tmp_path / "nats", port=port)
    server.start()
    own = settings.model_copy(update={"nats_url": server.url})
    try:
        await start_service("artifact-store", own)
        await start_service("planner", own)
        client = await nats_client.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        await RouterTestPeer(client, own.subjects.step_request, lambda r: result(r, "4")).start()
        assert (await submit(client, own, new_task(goal="before")))[-1].kind == "done"

        server.stop()
        server.start()
        await asyncio.sleep(1.0)  # the clients reconnect and resubscribe

        events = await submit(client, own, new_task(goal="after"), timeout_s=40)
        assert events[-1].kind == "done"
        await client.close()
    finally:
        server.stop()
