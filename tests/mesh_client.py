"""What tests do as a client of a live mesh, over plain nats-py as an agent in any language would:
submit a task and follow it, ask the router for a step or an inference service for a call, put and
read artifacts, read what a stream stored, wait for the planner's ack and for the accountant's usage
rows in ClickHouse, and read the local engine's load.

Artifacts are read as a tenant's (``tenant``; "default" when left out, as for a Task): the tenant of
the task that made them. A task is published with ``Nats-Msg-Id`` ``Task.dedupe_id()``, as every client does."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import clickhouse_connect
import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from schemas.messages import (
    TERMINAL_EVENTS,
    Artifact,
    ArtifactGet,
    ArtifactReply,
    InferenceRequest,
    InferenceResult,
    StepRequest,
    Task,
    TaskEvent,
    UsageEvent,
)
from schemas.subjects import HEADER_MSG_ID, STREAM_TASKS, STREAM_USAGE
from services.inference.engine_load import metrics_url

T = TypeVar("T")


async def submit(nc, settings, task: Task, timeout_s: float = 10.0) -> list[TaskEvent]:
    """Publish ``task`` as a client would and collect its events up to the terminal one."""
    sub = await nc.subscribe(settings.subjects.task_events_of(task.tenant, task.id))
    await nc.jetstream().publish(
        settings.subjects.task_submit(task.tenant), msgspec.json.encode(task), headers={HEADER_MSG_ID: task.dedupe_id()}
    )
    events: list[TaskEvent] = []
    try:
        while not events or events[-1].kind not in TERMINAL_EVENTS:
            events.append(msgspec.json.decode((await sub.next_msg(timeout=timeout_s)).data, type=TaskEvent))
    finally:
        await sub.unsubscribe()
    return events


async def wait_for_ack(nc, settings) -> None:
    """Until the task work queue is empty: a task message leaves it once the planner acks it."""
    js = nc.jetstream()
    for _ in range(50):
        if (await js.stream_info(settings.subjects.stream(STREAM_TASKS))).state.messages == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the task message was never acked")


async def request(nc, subject: str, message: msgspec.Struct, reply_type: type[T], timeout_s: float = 10.0) -> T:
    """Send ``message`` on ``subject`` and decode the reply as ``reply_type``."""
    reply = await nc.request(subject, msgspec.json.encode(message), timeout=timeout_s)
    return msgspec.json.decode(reply.data, type=reply_type)


async def ask(
    nc, settings, step: StepRequest, headers: dict[str, str] | None = None, timeout_s: float = 5.0
) -> InferenceResult:
    """Ask the router for one step, as the planner does."""
    reply = await nc.request(
        settings.subjects.step_request, msgspec.json.encode(step), timeout=timeout_s, headers=headers
    )
    return msgspec.json.decode(reply.data, type=InferenceResult)


async def call(nc, subject: str, inference: InferenceRequest, timeout_s: float = 10.0) -> InferenceResult:
    """Send one call straight to an inference service (``subject``), as the router does."""
    return await request(nc, subject, inference, InferenceResult, timeout_s)


async def put_artifact(nc, settings, artifact: Artifact) -> ArtifactReply:
    """Store ``artifact`` as its ``tenant``'s."""
    return await request(nc, settings.subjects.artifact_put(artifact.tenant), artifact, ArtifactReply, timeout_s=5)


async def get_artifact(nc, settings, artifact_id: str, tenant: str = "default") -> ArtifactReply:
    """The store's reply to ``tenant``'s get of ``artifact_id``."""
    get = ArtifactGet(id=artifact_id, tenant=tenant)
    return await request(nc, settings.subjects.artifact_get(get.tenant), get, ArtifactReply, timeout_s=5)


async def artifact(nc, settings, artifact_id: str, tenant: str = "default") -> Artifact:
    """``tenant``'s stored artifact, which must exist."""
    found = (await get_artifact(nc, settings, artifact_id, tenant)).artifact
    assert found is not None
    return found


async def stream_messages(nc, settings, stream: str) -> list[bytes]:
    """Every message stored on a mesh stream so far, in order."""
    js = nc.jetstream()
    name = settings.subjects.stream(stream)
    info = await js.stream_info(name)
    if not info.state.messages:
        return []
    return [(await js.get_msg(name, seq)).data for seq in range(info.state.first_seq, info.state.last_seq + 1)]


async def usage_events(nc, settings) -> list[UsageEvent]:
    """Every usage event stored on the usage stream so far, in order."""
    return [msgspec.json.decode(data, type=UsageEvent) for data in await stream_messages(nc, settings, STREAM_USAGE)]


async def usage_rows(
    clickhouse_url: str, database: str, where: str, parameters: dict[str, Any], *, columns: str, expected: int = 1
) -> list[dict[str, Any]]:
    """Rows of ``database``.usage_events matching ``where``, oldest first, once the accountant
    (which may run in this event loop, hence the async wait) has ingested ``expected`` of them."""
    client = clickhouse_connect.get_client(dsn=clickhouse_url)
    deadline = time.monotonic() + 30
    while True:
        result = client.query(
            f"SELECT {columns} FROM {database}.usage_events FINAL WHERE {where} ORDER BY time", parameters=parameters
        )
        rows = [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
        if len(rows) >= expected:
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} of {expected} usage rows after 30 s ({where}, {parameters})"
        await asyncio.sleep(0.2)


async def usage_row(clickhouse_url: str, database: str, call_id: str, columns: str) -> dict[str, Any]:
    """The one usage row of call ``call_id``, once the accountant has ingested it."""
    [row] = await usage_rows(clickhouse_url, database, "call_id = %(c)s", {"c": call_id}, columns=columns)
    return row


def engine_metrics(base_url: str) -> dict[str, float]:
    """The engine's /metrics samples by name (``base_url`` ends /v1)."""
    text = httpx.get(metrics_url(base_url)).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


async def wait_engine_idle(base_url: str) -> None:
    """Until the engine has nothing running or queued (another test's generations end)."""
    deadline = time.monotonic() + 60
    while True:
        load = await asyncio.to_thread(engine_metrics, base_url)
        if load["llamacpp:requests_processing"] == 0 and load["llamacpp:requests_deferred"] == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {load}"
        await asyncio.sleep(0.05)
