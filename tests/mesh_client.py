"""What tests do as a client of a live mesh: submit a task and follow it, read an artifact back,
wait for the accountant's usage rows in ClickHouse, and read the local engine's load."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import clickhouse_connect
import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from schemas.messages import (
    TERMINAL_EVENTS,
    Artifact,
    ArtifactGet,
    ArtifactReply,
    Task,
    TaskEvent,
)
from schemas.subjects import HEADER_MSG_ID
from services.inference.engine_load import metrics_url


async def submit(nc, settings, task: Task, timeout_s: float = 10.0) -> list[TaskEvent]:
    """Publish ``task`` as a client would and collect its events up to the terminal one."""
    sub = await nc.subscribe(settings.subjects.task_event(task.id))
    await nc.jetstream().publish(
        settings.subjects.task_submit, msgspec.json.encode(task), headers={HEADER_MSG_ID: task.id}
    )
    events: list[TaskEvent] = []
    try:
        while not events or events[-1].kind not in TERMINAL_EVENTS:
            events.append(msgspec.json.decode((await sub.next_msg(timeout=timeout_s)).data, type=TaskEvent))
    finally:
        await sub.unsubscribe()
    return events


async def artifact(nc, settings, artifact_id: str) -> Artifact:
    reply = await nc.request(
        settings.subjects.artifact_get, msgspec.json.encode(ArtifactGet(id=artifact_id)), timeout=5
    )
    found = msgspec.json.decode(reply.data, type=ArtifactReply).artifact
    assert found is not None
    return found


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
        rows = [dict(zip(result.column_names, row)) for row in result.result_rows]
        if len(rows) >= expected:
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} of {expected} usage rows after 30 s ({where}, {parameters})"
        await asyncio.sleep(0.2)


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
