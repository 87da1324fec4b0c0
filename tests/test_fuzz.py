"""Hostile messages on every subject and KV bucket the mesh consumes (issue 16, item 8), against the real
services on a real nats-server and ClickHouse, started once for the module.

What a service owes any sender, whatever it sends (payloads: tests/hostile.py):

- request/reply: an answer, never silence; a payload the schema cannot read is answered with a
  ``Rejection`` of kind ``invalid`` (never ``unavailable``, which is a service that failed on it), and
  every ``Rejection`` (and every refused artifact put) is on ``mesh.dlq.<service>`` with its reason
  and the message, cut down with its size when too large to keep whole;
- streams and core subjects: a message the service cannot read is dead-lettered; a usage event is
  either a row in ClickHouse or dead-lettered, a task either ends (a terminal event) or is
  dead-lettered: nothing is dropped silently;
- KV buckets (control, budgets, virtual keys): a value that is not the bucket's type, or whose body
  names another key than the one it is stored under, is dead-lettered by every reader and skipped;
  the watch goes on;
- and afterwards every service still answers a valid request (the last test).

CI runs ``EXAMPLES`` examples per subject (``settings.max_examples``), derandomized so a failure
reproduces; ``FRUGALMESH_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`` runs more.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import msgspec
import nats
import pytest
from fakes.grants import granted
from helpers import SHORT, budget_set, eventually, kill_switch, make_request, make_step, new_task, pace_signal
from hostile import decodes, headers, payloads
from hypothesis import HealthCheck, Phase, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from mesh_client import submit

from frugalmesh.agents import Agent, Context
from schemas.messages import (
    TERMINAL_EVENTS,
    AgentRequest,
    AgentResult,
    Artifact,
    ArtifactGet,
    ArtifactReply,
    BudgetCap,
    BudgetQuery,
    BudgetState,
    BudgetUpdate,
    DeadLetter,
    Feedback,
    InferenceResult,
    KillSwitch,
    LocalLoad,
    PaceSignal,
    Rejection,
    Reservation,
    ReservationDecision,
    Task,
    TaskEvent,
    UsageEvent,
    VirtualKey,
)
from schemas.subjects import (
    BUCKET_BUDGETS,
    BUCKET_CONTROL,
    BUCKET_KEYS,
    KV_API,
    OPERATOR_KILL,
    STREAM_ARTIFACT_EVENTS,
    STREAM_CONTROL,
    STREAM_DLQ,
    STREAM_FEEDBACK,
    STREAM_TASK_EVENTS,
    STREAM_TASKS,
    STREAM_USAGE,
    Subjects,
    control_kill_key,
    control_pace_key,
    token,
)
from services.accountant.budget import BudgetBook, BudgetConfig, kv_key
from services.accountant.clickhouse import client as clickhouse_client
from services.gateway.keys import KeyCache, KeyStore, secret_hash
from services.registry import create_app
from services.runtime.bus import Bus, now_ms
from services.runtime.data import load_recorded_outcomes
from services.runtime.settings import MeshSettings

pytestmark = [pytest.mark.infra, pytest.mark.slow]

EXAMPLES = int(os.environ.get("FRUGALMESH_FUZZ_EXAMPLES", "25"))
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    # No shrinking: each example is a round trip to real services, and the failing one is printed as it is.
    phases=(Phase.explicit, Phase.generate),
)
LOCAL = "mixtral-8x7b-local"
FRONTIER = "gpt-4-1106-preview"
TENANT = "fuzz"
# Every reader of the control bucket dead-letters a bad value on its own.
CONTROL_READERS = ("accountant", "router", "local-inference", "cloud-inference")
SERVICES = ("artifact-store", "accountant", "router", "local-inference", "cloud-inference", "planner")
ids = itertools.count()


@cache
def prompt() -> str:
    """A recorded GSM8K prompt: the replay backends answer only recorded prompts."""
    return next(r.prompt for r in load_recorded_outcomes(Path(os.environ["FRUGALMESH_DATA"])) if r.dataset == "gsm8k")


echo = Agent("fuzz-echo", consumes=["prompt"], produces=["answer"], description="answers with its goal")


@echo.handler
async def _answer(ctx: Context):
    return await ctx.put("answer", {"text": ctx.goal})


@dataclass(repr=False)
class Letters:
    """Every dead letter of the module's mesh, as it is published (a core subscription on dlq.>)."""

    received: list[DeadLetter] = field(default_factory=list)

    def __repr__(self) -> str:  # what a failing example prints: not every letter of the module
        return f"Letters({len(self.received)} received)"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # hypothesis prints arguments with this
        printer.text(repr(self))

    async def of(self, service: str, subject: str, payload: bytes, timeout_s: float = 10.0) -> DeadLetter:
        """The letter ``service`` wrote for ``payload`` on ``subject``: the message whole, or its first
        bytes when it was too large to keep, with its size in the error."""

        def find() -> DeadLetter | None:
            for letter in self.received:
                if letter.service != service or letter.subject != subject:
                    continue
                whole = letter.data == payload
                cut = payload.startswith(letter.data) and f"of {len(payload)} bytes kept" in letter.error
                if whole or cut:
                    return letter
            return None

        def missing() -> str:
            near = [(x.service, len(x.data), x.error[-120:]) for x in self.received if x.subject == subject][-5:]
            return f"{service} dead-lettered nothing for {payload[:200]!r} ({len(payload)} bytes); on {subject}: {near}"

        letter = await eventually(find, timeout_s, message=missing)
        assert letter.error, letter
        return letter


@dataclass
class Mesh:
    settings: MeshSettings
    nc: nats.NATS
    letters: Letters
    database: str


@pytest.fixture(scope="module")
async def mesh(infra, data_dir) -> AsyncIterator[Mesh]:
    """Every service (and an agent) on the session's servers, on the module's own prefix and database."""
    settings = MeshSettings(
        nats_url=infra.nats_url,
        clickhouse_url=infra.clickhouse_url,
        subject_prefix="fz" + uuid.uuid4().hex[:8],
        data=data_dir,
        log_level="ERROR",
    )
    nc = await nats.connect(infra.nats_url, drain_timeout=2, **MeshSettings().nats_options())
    letters = Letters()

    async def keep(msg) -> None:
        letters.received.append(msgspec.json.decode(msg.data, type=DeadLetter))

    database = "fz_" + uuid.uuid4().hex[:8]
    apps = []
    for name in SERVICES:
        options = {"database": database} if name == "accountant" else {}
        apps.append(create_app(name, settings, **options))
        await apps[-1].start()
    apps.append(echo.app(settings))
    await apps[-1].start()
    # From the stream the services declared, with flow control: a core subscription could drop letters
    # (a slow consumer) when thousands arrive, some of them near 1 MiB.
    stream = settings.subjects.stream(STREAM_DLQ)
    await nc.jetstream().subscribe(settings.subjects.dlq_all, stream=stream, ordered_consumer=True, cb=keep)
    yield Mesh(settings, nc, letters, database)
    for app in reversed(apps):
        await asyncio.wait_for(app.stop(), 10)
    await nc.drain()


def _draw(data: st.DataObject, example: msgspec.Struct, mesh: Mesh) -> bytes:
    """A hostile payload around ``example`` that nats-py will send (it refuses one over the server's limit)."""
    payload = data.draw(payloads(example), label="payload")
    assume(len(payload) < mesh.nc.max_payload - 8192)
    return payload


# -- request/reply subjects --


def _rejection(data: bytes) -> Rejection | None:
    """The reply as a Rejection, if it is one (exactly v and error: an AgentResult with an error is not)."""
    try:
        fields = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    if not isinstance(fields, dict) or set(fields) != {"v", "error"}:
        return None
    return msgspec.json.decode(data, type=Rejection)


def _reservation() -> Reservation:
    return Reservation(
        id=f"fz-{next(ids):06d}",
        tenant=TENANT,
        task_id="t1",
        model=FRONTIER,
        amount_usd=0.01,
        expires_ms=now_ms() + 60_000,
    )


def _agent_request() -> AgentRequest:
    return AgentRequest(
        task_id=f"fz{next(ids):06d}",
        step_id="answer",
        tenant=TENANT,
        agent=echo.name,
        goal=SHORT,
        artifact="answer",
        deadline_ms=now_ms() + 10_000,
    )


def _artifact() -> Artifact:
    return Artifact(tenant=TENANT, type="answer", body={"text": f"answer {next(ids):06d}"}, task_id="t1", step_id="s1")


@dataclass(frozen=True)
class Served:
    """A request/reply subject: who serves it, where, a fresh valid request, and the reply type."""

    service: str
    subject: Callable[[Subjects], str]
    valid: Callable[[], msgspec.Struct]
    reply: type[msgspec.Struct]


REQUESTS = {
    "artifact put": Served("artifact-store", lambda s: s.artifact_put(TENANT), _artifact, ArtifactReply),
    "artifact get": Served(
        "artifact-store", lambda s: s.artifact_get(TENANT), lambda: ArtifactGet(id="0" * 64), ArtifactReply
    ),
    "step": Served("router", lambda s: s.step_request, lambda: make_step(prompt(), tenant=TENANT), InferenceResult),
    "local call": Served(
        "local-inference", lambda s: s.infer_local(LOCAL), lambda: make_request(LOCAL, prompt()), InferenceResult
    ),
    "cloud call": Served(
        "cloud-inference",
        lambda s: s.infer_cloud("openai"),
        lambda: granted(make_request(FRONTIER, prompt())),
        InferenceResult,
    ),
    "reserve": Served("accountant", lambda s: s.budget_reserve, _reservation, ReservationDecision),
    "settle": Served("accountant", lambda s: s.budget_settle, _reservation, ReservationDecision),
    "budget show": Served("accountant", lambda s: s.budget_show, lambda: BudgetQuery(scope="tenant"), BudgetState),
    "budget set": Served(
        "accountant", budget_set, lambda: BudgetUpdate(scope="tenant", key=TENANT, day_usd=5.0), BudgetState
    ),
    "operator kill": Served(
        "accountant",
        lambda s: s.operator(MeshSettings().operator, OPERATOR_KILL),
        lambda: kill_switch("model", "fuzz-model", tripped=False),
        KillSwitch,
    ),
    "agent": Served(f"agent-{echo.name}", lambda s: s.agent(echo.name), _agent_request, AgentResult),
}


@pytest.mark.parametrize("name", list(REQUESTS))
@FUZZ
@given(data=st.data())
async def test_every_hostile_request_is_answered_and_every_rejection_dead_lettered(mesh, name, data):
    served = REQUESTS[name]
    subject = served.subject(mesh.settings.subjects)
    valid = served.valid()
    payload = _draw(data, valid, mesh)

    reply = await mesh.nc.request(subject, payload, timeout=15, headers=data.draw(headers, label="headers"))

    rejection = _rejection(reply.data)
    if not decodes(payload, type(valid)):
        assert rejection is not None, f"an unreadable {name} was answered {reply.data[:300]!r}"
    if rejection is None:
        answer = msgspec.json.decode(reply.data, type=served.reply)
        if name == "artifact put" and answer.error:  # a refused put is kept like any bad input
            await mesh.letters.of(served.service, subject, payload)
        return
    assert rejection.error.kind == "invalid", rejection.error
    await mesh.letters.of(served.service, subject, payload)


# -- streams and core subjects --


def _usage() -> UsageEvent:
    return UsageEvent(
        event_id=f"fz-{uuid.uuid4().hex}",
        time_ms=now_ms(),
        tenant=TENANT,
        task_id="t1",
        service="router",
        tier="frontier",
        provider="openai",
        model=FRONTIER,
        requested_model=FRONTIER,
        cost_usd=0.001,
        outcome="ok",
    )


def _task_event() -> TaskEvent:
    return TaskEvent(task_id=f"fz{next(ids):06d}", kind="done", time_ms=now_ms(), tenant=TENANT, workflow="answer")


def _load() -> LocalLoad:
    return LocalLoad(model=LOCAL, replica="fuzz", running=1, waiting=2, kv_cache_usage=0.5, time_ms=now_ms())


def _feedback() -> Feedback:
    return Feedback(
        feedback_id=f"fz{next(ids):06d}", time_ms=now_ms(), tenant=TENANT, call_id="c1", score=1.0, source="user"
    )


# (service, subject, stream (None: core NATS), a valid message, its type)
PUBLISHED = {
    "usage": ("accountant", lambda s: s.usage(TENANT), STREAM_USAGE, _usage, UsageEvent),
    "task end": (
        "accountant",
        lambda s: s.task_event(TENANT, "t1", "done"),
        STREAM_TASK_EVENTS,
        _task_event,
        TaskEvent,
    ),
    "artifact created": (
        "accountant",
        lambda s: s.artifact_created("answer"),
        STREAM_ARTIFACT_EVENTS,
        _artifact,
        Artifact,
    ),
    "kill record": (
        "accountant",
        lambda s: s.control_kill,
        STREAM_CONTROL,
        lambda: kill_switch("tenant", TENANT),
        KillSwitch,
    ),
    "feedback": ("accountant", lambda s: s.feedback(TENANT), STREAM_FEEDBACK, _feedback, Feedback),
    "local load": ("router", lambda s: s.local_load(LOCAL), None, _load, LocalLoad),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
@FUZZ
@given(data=st.data())
async def test_every_unreadable_published_message_is_dead_lettered(mesh, name, data):
    service, subject_of, stream, valid, message_type = PUBLISHED[name]
    subject = subject_of(mesh.settings.subjects)
    payload = _draw(data, valid(), mesh)

    if stream is None:
        await mesh.nc.publish(subject, payload, headers=data.draw(headers, label="headers"))
    else:
        await mesh.nc.jetstream().publish(subject, payload, stream=mesh.settings.subjects.stream(stream))

    if not decodes(payload, message_type):
        await mesh.letters.of(service, subject, payload)
    elif name == "usage":
        await _stored_or_dead_lettered(mesh, subject, payload)


async def _stored_or_dead_lettered(mesh: Mesh, subject: str, payload: bytes) -> None:
    """A readable usage event is a row in ClickHouse or a dead letter: a bill never vanishes."""
    event_id = msgspec.json.decode(payload, type=UsageEvent).event_id
    ch = clickhouse_client(mesh.settings.clickhouse_url)

    def stored() -> bool:
        rows = ch.query(
            f"SELECT count() FROM {mesh.database}.usage_events WHERE event_id = {{id:String}}",
            parameters={"id": event_id},
        ).result_rows
        return rows[0][0] > 0

    def settled() -> bool:
        letter = any(letter.data == payload or payload.startswith(letter.data) for letter in mesh.letters.received)
        return letter or stored()

    try:
        await eventually(lambda: asyncio.to_thread(settled), 15, interval_s=0.2, message=f"usage {event_id!r} vanished")
    finally:
        ch.close()


@FUZZ
@given(data=st.data())
async def test_every_hostile_task_ends_or_is_dead_lettered(mesh, data):
    subjects = mesh.settings.subjects
    valid = Task(id=f"fz{next(ids):06d}", tenant=TENANT, goal=prompt(), submitted_ms=now_ms())
    payload = _draw(data, valid, mesh)
    try:
        task = msgspec.json.decode(payload, type=Task)
        token(task.id), token(task.tenant)
    except (msgspec.DecodeError, RecursionError, ValueError):
        task = None
    ending = None if task is None else await mesh.nc.subscribe(subjects.task_events_of(task.tenant, task.id))

    await mesh.nc.jetstream().publish(
        subjects.task_submit(TENANT),
        payload,
        stream=subjects.stream(STREAM_TASKS),
        headers=data.draw(headers, label="headers"),
    )

    if ending is None:
        await mesh.letters.of("planner", subjects.task_submit(TENANT), payload)
        return
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            event = msgspec.json.decode((await ending.next_msg(timeout=30)).data, type=TaskEvent)
            if event.kind in TERMINAL_EVENTS:
                return
        raise AssertionError(f"task {task.id} never ended")
    finally:
        await ending.unsubscribe()


# -- KV buckets --

CONTROL_KEYS = (
    control_kill_key("tenant", TENANT),
    control_kill_key("model", "fuzz-model"),
    control_kill_key("task", f"{TENANT}.t1"),
    control_pace_key(TENANT),
)


def _control_example(key: str) -> KillSwitch | PaceSignal:
    if key.startswith("pace."):
        return pace_signal(TENANT, "normal")
    scope, _, name = key.removeprefix("kill.").partition(".")
    return kill_switch(scope, name, tripped=False)


@FUZZ
@given(data=st.data())
async def test_every_unreadable_control_value_is_dead_lettered_by_every_reader(mesh, bus_of, data):
    key = data.draw(st.sampled_from(CONTROL_KEYS), label="key")
    example = _control_example(key)
    value = _draw(data, example, mesh)
    bus = await bus_of("test")
    kv = await bus.key_value(mesh.settings.subjects.bucket(BUCKET_CONTROL))

    await kv.put(key, value)

    try:
        if not _names_its_key(value, key):
            subject = f"{KV_API}.{mesh.settings.subjects.bucket(BUCKET_CONTROL)}.{key}"
            for service in CONTROL_READERS:
                await mesh.letters.of(service, subject, value)
    finally:
        await kv.put(key, msgspec.json.encode(example))  # cleared again: the next example starts clean


async def test_a_control_value_naming_another_key_is_dead_lettered_by_every_reader(mesh, bus_of):
    bucket = mesh.settings.subjects.bucket(BUCKET_CONTROL)
    kv = await (await bus_of("test")).key_value(bucket)
    # Another tenant's throttle under this tenant's pace key; a global trip under a tenant's switch.
    misfiled = {
        control_pace_key(TENANT): msgspec.json.encode(pace_signal("victim", "throttle")),
        control_kill_key("tenant", TENANT): msgspec.json.encode(kill_switch("global")),
    }

    for key, value in misfiled.items():
        await kv.put(key, value)

    try:
        for key, value in misfiled.items():
            for service in CONTROL_READERS:
                letter = await mesh.letters.of(service, f"{KV_API}.{bucket}.{key}", value)
                assert letter.error.startswith(f"control value {key}: the value is for "), letter.error
                assert letter.error.endswith(f"stored under {key!r}"), letter.error
    finally:
        for key in misfiled:
            await kv.put(key, msgspec.json.encode(_control_example(key)))


def _names_its_key(value: bytes, key: str) -> bool:
    """Whether ``value`` is a switch or signal for exactly the key it is stored under."""
    if key.startswith("pace."):
        if not decodes(value, PaceSignal):
            return False
        return control_pace_key(msgspec.json.decode(value, type=PaceSignal).tenant) == key
    if not decodes(value, KillSwitch):
        return False
    switch = msgspec.json.decode(value, type=KillSwitch)
    return control_kill_key(switch.scope, switch.key) == key


@FUZZ
@given(data=st.data())
async def test_every_unreadable_budget_value_is_dead_lettered_and_skipped(mesh, bus_of, data):
    scope_key = f"fz{next(ids):06d}"
    example = BudgetCap(scope="tenant", key=scope_key, day_usd=3.0)
    value = _draw(data, example, mesh)
    bus = await bus_of("accountant")
    kv = await bus.key_value(mesh.settings.subjects.bucket(BUCKET_BUDGETS), history=16)
    await kv.put(f"tenant.{scope_key}", value)
    book = BudgetBook(BudgetConfig())

    try:
        await book.open(bus)
    finally:
        await kv.purge(f"tenant.{scope_key}")

    readable = decodes(value, BudgetCap) and _caps_of(msgspec.json.decode(value, type=BudgetCap), f"tenant.{scope_key}")
    if not readable:
        subject = f"{KV_API}.{mesh.settings.subjects.bucket(BUCKET_BUDGETS)}.tenant.{scope_key}"
        await mesh.letters.of("accountant", subject, value)


async def test_a_budget_value_naming_another_scope_is_dead_lettered_and_sets_no_caps(mesh, bus_of):
    bus = await bus_of("accountant")
    bucket = mesh.settings.subjects.bucket(BUCKET_BUDGETS)
    kv = await bus.key_value(bucket, history=16)
    value = msgspec.json.encode(BudgetCap(scope="tenant", key="victim", day_usd=0.0))  # a $0 cap for another tenant
    await kv.put("tenant.misfiled", value)
    book = BudgetBook(BudgetConfig())

    try:
        await book.open(bus)
    finally:
        await kv.purge("tenant.misfiled")

    assert book.cap("tenant", "victim", "day") is None and book.cap("tenant", "misfiled", "day") is None
    letter = await mesh.letters.of("accountant", f"{KV_API}.{bucket}.tenant.misfiled", value)
    assert (
        letter.error == "budget value tenant.misfiled: the caps are for 'tenant.victim', stored under 'tenant.misfiled'"
    )


def _caps_of(cap: BudgetCap, key: str) -> bool:
    """Whether ``cap`` holds non-negative caps for exactly the key it is stored under."""
    return kv_key(cap.scope, cap.key) == key and all(usd is None or usd >= 0 for usd in (cap.day_usd, cap.month_usd))


@FUZZ
@given(data=st.data())
async def test_every_unreadable_virtual_key_is_dead_lettered_and_the_watch_goes_on(mesh, key_cache, data):
    cache, store, kv = key_cache
    created, example = await store.create(TENANT, name=f"fz{next(ids):06d}")
    value = _draw(data, example, mesh)
    hashed = secret_hash(created)

    await kv.put(hashed, value)

    if not decodes(value, VirtualKey):
        subject = f"{KV_API}.{mesh.settings.subjects.bucket(BUCKET_KEYS)}.{hashed}"
        await mesh.letters.of("gateway", subject, value)
        await eventually(lambda: cache.lookup(created) is None)
    again, again_key = await store.create(TENANT, name="after")
    await eventually(lambda: cache.lookup(again) == again_key)  # the watch went on


@pytest.fixture(scope="module")
async def bus_of(mesh) -> AsyncIterator:
    """``await bus_of(service)``: a Bus on the module's mesh named as that service (its dead letters say so)."""
    buses: dict[str, Bus] = {}

    async def of(service: str) -> Bus:
        if service not in buses:
            buses[service] = Bus(mesh.settings, service)
            await buses[service].connect()
        return buses[service]

    yield of
    for bus in buses.values():
        await bus.close()


@pytest.fixture(scope="module")
async def key_cache(mesh, bus_of):
    """A gateway replica's key cache (the real reader of the keys bucket), and a key store to write with."""
    bus = await bus_of("gateway")
    store = await KeyStore.open(bus)
    cache = await KeyCache.open(bus)
    yield cache, store, await bus.key_value(mesh.settings.subjects.bucket(BUCKET_KEYS))
    await cache.close()


# -- afterwards --


async def test_every_service_still_answers_a_valid_request_after_the_fuzz(mesh):
    subjects, nc = mesh.settings.subjects, mesh.nc
    for name, served in REQUESTS.items():
        reply = await nc.request(served.subject(subjects), msgspec.json.encode(served.valid()), timeout=15)
        assert _rejection(reply.data) is None, (name, reply.data[:300])
        msgspec.json.decode(reply.data, type=served.reply)
    # Another tenant's: the fuzz may have capped its own.
    [*_, done] = await submit(nc, mesh.settings, new_task(goal=prompt()), timeout_s=30)
    assert done.kind == "done", [(e.kind, e.step_id, e.detail) for e in done.history] + [done.detail]
