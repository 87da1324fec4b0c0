"""Bad input and crashes that must not stop the mesh or leak from it (issue 16, items 6 and 7), on a real
nats-server: a provider error echoing secrets leaves none in results, usage or logs; garbage in the
control and budgets buckets is dead-lettered and the watch goes on; a task that reaches the planner's
delivery limit ends ``failed`` once; a bad message near NATS's payload limit still reaches the
dead-letter subject, truncated, with its size."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from fakes.deploy import openai_deploy
from fakes.grants import granted
from fakes.router_peer import result
from helpers import eventually, kill_switch, make_request, new_task
from mesh_client import call, stream_messages, submit, usage_events, wait_for_ack

from schemas.messages import BudgetCap, DeadLetter, Rejection, Task, TaskEvent
from schemas.subjects import BUCKET_BUDGETS, BUCKET_CONTROL, KV_API, STREAM_DLQ, STREAM_TASK_EVENTS, STREAM_USAGE
from services.accountant.budget import BudgetBook, BudgetConfig
from services.accountant.ledger import pico
from services.planner import app as planner_app
from services.planner.dag import Planner
from services.planner.events import EventPublisher
from services.planner.keep_alive import KeepAlive
from services.runtime.bus import Bus, encode
from services.runtime.control import control_bucket, set_kill
from services.runtime.data import load_recorded_outcomes
from services.runtime.scrub import REDACTED
from services.runtime.streams import ensure_streams

pytestmark = pytest.mark.infra

FRONTIER = "gpt-4-1106-preview"


async def dead_letters(nc, settings) -> list[DeadLetter]:
    return [msgspec.json.decode(d, type=DeadLetter) for d in await stream_messages(nc, settings, STREAM_DLQ)]


# -- secrets (item 7) --


async def test_a_provider_error_echoing_secrets_leaves_none_in_the_result_usage_or_logs(
    settings, fake_openai, start_service, nc, tmp_path, monkeypatch, capfd
):
    key = "sk-proj-" + "Kq7vR2" * 8
    monkeypatch.setenv("OPENAI_API_KEY", key)
    # The provider's URL carries user info, and its error answer echoes the key three ways.
    host = fake_openai.url.removeprefix("http://")
    deploy = openai_deploy(tmp_path / "deploy", f"http://ops:hunter2@{host}")
    fake_openai.behaviour.api_key = None
    fake_openai.behaviour.status = 401
    fake_openai.behaviour.error_message = (
        f"Incorrect API key provided: {key}; you sent Authorization: Bearer {key} "
        f"through https://ops:hunter2@proxy.internal/v1?api_key={key}"
    )
    settings = settings.model_copy(update={"deploy_dir": deploy, "log_level": "INFO"})
    await start_service("cloud-inference", settings)

    result = await call(nc, settings.subjects.infer_cloud("openai"), granted(make_request(FRONTIER, "Hi")))

    assert len(fake_openai.requests) == 1
    assert result.error is not None and result.error.kind == "provider"
    message = result.error.message
    assert message.startswith(f"HTTP 401 from http://{REDACTED}@{host}/chat/completions: ")
    assert "Incorrect API key provided" in message and message.count(REDACTED) == 5
    usage = await stream_messages(nc, settings, STREAM_USAGE)
    [event] = await usage_events(nc, settings)
    assert event.outcome == "error"
    logged = capfd.readouterr().err
    assert "call_failed" in logged and REDACTED in logged
    for leaked in (key, "hunter2"):
        assert leaked not in message and leaked not in logged
        assert not any(leaked.encode() in data for data in usage)


# -- the control and budgets buckets (item 6) --


async def test_garbage_in_the_control_bucket_is_dead_lettered_and_a_later_trip_still_stops_calls(
    settings, start_service, nc, bus, data_dir
):
    prompts = iter(r.prompt for r in load_recorded_outcomes(data_dir) if r.dataset == "gsm8k")
    await ensure_streams(bus.jetstream, bus.subjects)
    await control_bucket(bus)
    kv = await nc.jetstream().key_value(settings.subjects.bucket(BUCKET_CONTROL))
    # Before the service starts (read at start) and after (pushed by the watch).
    await kv.put("pace.acme", b"not json")
    await start_service("cloud-inference", settings)
    subject = settings.subjects.infer_cloud("openai")
    await kv.put("kill.global", b'{"scope": "global"}')
    await kv.put("kill.model.gpt-4", b"\xff\xfe")

    await set_kill(bus, kill_switch("tenant", "acme"))

    async def killed():
        result = await call(nc, subject, granted(make_request(FRONTIER, next(prompts), tenant="acme")))
        return result.error is not None and result.error.kind == "killed"

    await eventually(killed, timeout_s=3)
    spared = await call(nc, subject, granted(make_request(FRONTIER, next(prompts), tenant="globex")))
    assert spared.error is None
    # Garbage written over a tripped switch leaves it tripped.
    await kv.put("kill.tenant.acme", b"cleared?")

    async def letters_of(count: int) -> list[DeadLetter] | None:
        letters = await dead_letters(nc, settings)
        return letters if len(letters) == count else None

    letters = await eventually(lambda: letters_of(4), timeout_s=3)
    assert await killed()
    bucket = settings.subjects.bucket(BUCKET_CONTROL)
    assert sorted((d.service, d.subject, d.data) for d in letters) == [
        ("cloud-inference", f"{KV_API}.{bucket}.kill.global", b'{"scope": "global"}'),
        ("cloud-inference", f"{KV_API}.{bucket}.kill.model.gpt-4", b"\xff\xfe"),
        ("cloud-inference", f"{KV_API}.{bucket}.kill.tenant.acme", b"cleared?"),
        ("cloud-inference", f"{KV_API}.{bucket}.pace.acme", b"not json"),
    ]
    assert all(d.error.startswith("control value ") for d in letters)


async def test_garbage_in_the_budgets_bucket_is_dead_lettered_and_the_valid_caps_apply(settings, nc, bus):
    await ensure_streams(bus.jetstream, bus.subjects)
    kv = await bus.key_value(settings.subjects.bucket(BUCKET_BUDGETS), history=16)
    await kv.put("tenant.bad", b"{not json")
    await kv.put("tenant.neg", encode(BudgetCap(scope="tenant", key="neg", day_usd=-5.0)))
    await kv.put("tenant.acme", encode(BudgetCap(scope="tenant", key="acme", day_usd=2.0)))
    book = BudgetBook(BudgetConfig())

    await book.open(bus)

    assert book.cap("tenant", "acme", "day") == pico(2.0)
    assert book.cap("tenant", "neg", "day") is None
    bucket = settings.subjects.bucket(BUCKET_BUDGETS)
    letters = await dead_letters(nc, settings)
    assert sorted(d.subject for d in letters) == [f"{KV_API}.{bucket}.tenant.bad", f"{KV_API}.{bucket}.tenant.neg"]
    assert all(d.error.startswith("budget value ") for d in letters)


# -- the planner's delivery limit (item 6) --


async def test_a_task_that_crashes_the_planner_on_every_delivery_ends_failed_once(
    settings, nc, planner_mesh, monkeypatch
):
    runs: list[str] = []

    async def crash(self, task, schedule_run=""):
        runs.append(task.id)
        raise RuntimeError("the planner tripped over this task")

    monkeypatch.setattr(Planner, "run", crash)
    await planner_mesh()
    task = new_task(goal="q")

    events = await submit(nc, settings, task)

    assert runs == [task.id] * 3
    [failed] = events
    assert failed.kind == "failed" and failed.task_id == task.id
    assert failed.detail.startswith("delivery limit: the planner failed this task 3 times")
    assert "RuntimeError('the planner tripped over this task')" in failed.detail
    await wait_for_ack(nc, settings)
    await _ended_once_and_dead_lettered(nc, settings, task, failed)


async def test_a_task_whose_runs_never_end_is_failed_by_jetstreams_max_deliveries_advisory(
    settings, nc, planner_mesh, monkeypatch
):
    runs: list[str] = []

    async def vanish(self, task, schedule_run=""):
        runs.append(task.id)
        # What a planner stopped mid-run leaves: no ack, no nack; JetStream delivers the task again
        # once ack_wait passes, as it does when a planner process dies.
        raise asyncio.CancelledError

    monkeypatch.setattr(Planner, "run", vanish)
    await planner_mesh(ack_wait_s=1.0)
    task = new_task(goal="q")

    events = await submit(nc, settings, task, timeout_s=15)

    assert runs == [task.id] * 3
    [failed] = events
    assert failed.kind == "failed"
    assert failed.detail.startswith("delivery limit: the planner took this task 3 times and no run ended it")
    # The advisory's planner deleted the task's message from the work queue.
    await wait_for_ack(nc, settings)
    await _ended_once_and_dead_lettered(nc, settings, task, failed)


async def test_a_run_that_raises_after_its_calls_hands_their_count_and_cost_to_the_next_run(
    settings, nc, planner_mesh, router_peers, monkeypatch
):
    """JetStream not answering while a run stores its terminal event (as when a node is lost): the run
    raises after its call, and the task runs again. Its terminal event counts every run's calls and
    cost, as the usage rows and the task's budget do; with no run left, so does the ``failed`` event."""
    original_emit = EventPublisher.emit
    refused: list[str] = []

    async def done_not_stored(self, task, kind, **fields):
        if kind == "done" and (task.goal == "always" or task.id not in refused):
            refused.append(task.id)
            raise RuntimeError("nats: no response from stream")
        await original_emit(self, task, kind, **fields)

    monkeypatch.setattr(EventPublisher, "emit", done_not_stored)
    await planner_mesh()
    peer = await router_peers(settings, lambda r: result(r, "ok", cost_usd=0.25))

    once = await submit(nc, settings, new_task(goal="once"), timeout_s=15)
    always = await submit(nc, settings, new_task(goal="always"), timeout_s=15)

    runs = planner_app.MAX_DELIVER
    assert len(peer.requests) == 2 + runs
    assert (once[-1].kind, once[-1].calls, once[-1].cost_usd) == ("done", 2, 0.5)
    assert (always[-1].kind, always[-1].calls, always[-1].cost_usd) == ("failed", runs, 0.25 * runs)
    assert always[-1].detail.startswith(f"delivery limit: the planner failed this task {runs} times")
    await wait_for_ack(nc, settings)


async def test_an_artifact_store_that_comes_back_keeps_the_answer_already_paid_for(
    settings, nc, start_service, router_peers, monkeypatch
):
    """No artifact store while the step's answer comes (a store restarting, a cluster electing a leader):
    the planner asks again until one answers, and the task ends done on its one call."""
    task = new_task(goal="q")
    puts: list[str] = []
    original_request = Bus.request

    async def counted(self, subject, *args, **kwargs):
        if subject == settings.subjects.artifact_put(task.tenant):
            puts.append(subject)
        return await original_request(self, subject, *args, **kwargs)

    monkeypatch.setattr(Bus, "request", counted)
    await start_service("planner", settings)
    peer = await router_peers(settings, lambda r: result(r, "ok"))
    submitted = asyncio.create_task(submit(nc, settings, task, timeout_s=15))
    await eventually(lambda: len(puts) >= 2, timeout_s=10)  # the answer's put found no store, and was sent again

    await start_service("artifact-store", settings)

    events = await submitted
    assert (events[-1].kind, events[-1].calls) == ("done", 1)
    assert len(peer.requests) == 1
    await wait_for_ack(nc, settings)


async def test_a_task_delivered_again_while_its_run_goes_on_runs_once(
    settings, nc, planner_mesh, router_peers, monkeypatch
):
    """JetStream delivers a task again while its run goes on (here its marks stop, so its ack wait passes;
    a consumer whose leader moved does the same): the run in progress answers for both deliveries,
    and the task's model call is made once."""

    async def no_marks(self) -> None:
        return None

    monkeypatch.setattr(KeepAlive, "sweep", no_marks)
    # Deliveries enough that a slow machine's run is never given up on while JetStream repeats it.
    monkeypatch.setattr(planner_app, "MAX_DELIVER", 20)
    await planner_mesh(ack_wait_s=1.0)
    peer = await router_peers(settings, lambda r: result(r, "ok"), delay_s=2.5)
    task = new_task(goal="q")

    events = await submit(nc, settings, task, timeout_s=15)

    assert (events[-1].kind, events[-1].calls) == ("done", 1)
    assert len(peer.requests) == 1
    await wait_for_ack(nc, settings)
    stored = [msgspec.json.decode(d, type=TaskEvent) for d in await stream_messages(nc, settings, STREAM_TASK_EVENTS)]
    assert [(e.task_id, e.kind) for e in stored] == [(task.id, "done")]


async def _ended_once_and_dead_lettered(nc, settings, task, failed: TaskEvent) -> None:
    stored = [msgspec.json.decode(d, type=TaskEvent) for d in await stream_messages(nc, settings, STREAM_TASK_EVENTS)]
    assert [(e.task_id, e.kind) for e in stored] == [(task.id, "failed")]
    [letter] = await dead_letters(nc, settings)
    assert (letter.service, letter.error) == ("planner", failed.detail)
    assert msgspec.json.decode(letter.data, type=Task).id == task.id


# -- dead letters near the payload limit (item 6) --


async def test_a_bad_message_near_the_payload_limit_is_dead_lettered_truncated_with_its_size(
    settings, start_service, nc
):
    await start_service("artifact-store", settings)
    garbage = b"\x00not an artifact " * ((nc.max_payload - 4096) // 17)

    reply = await nc.request(settings.subjects.artifact_put("default"), garbage, timeout=10)

    assert msgspec.json.decode(reply.data, type=Rejection).error.kind == "invalid"
    [letter] = await dead_letters(nc, settings)
    assert (letter.service, letter.subject) == ("artifact-store", settings.subjects.artifact_put("default"))
    assert 0 < len(letter.data) < len(garbage) and garbage.startswith(letter.data)
    assert f"the first {len(letter.data)} of {len(garbage)} bytes kept" in letter.error
    assert letter.error.startswith("Artifact")


async def test_a_dead_letter_that_cannot_be_stored_is_logged_not_raised(capfd, settings):
    # Made here, so that its log goes to this test's captured stderr.
    bus = Bus(settings, "robustness")
    await bus.connect()
    try:
        # No streams are declared on this test's prefix: nothing stores the dead-letter subject.
        await bus.dead_letter("anywhere", b"bad", None, "refused")
    finally:
        await bus.close()

    assert '"event": "dead_letter_lost"' in capfd.readouterr().err
