"""A mesh client as any agent would write one: plain nats-py and the shared schemas."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from schemas.messages import TERMINAL_EVENTS, Artifact, ArtifactGet, ArtifactRef, ArtifactReply, Task, TaskEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_TASKS
from services.runtime.bus import now_ms
from services.runtime.settings import MeshSettings


async def _log_nats_error(exc: Exception) -> None:
    # nats-py's default prints a traceback per failed attempt; a command reports the outcome once.
    logging.getLogger("frugalmesh.client").debug("nats error: %s", exc)


def new_task_id() -> str:
    return uuid.uuid4().hex


class MeshClient:
    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.nc: Client | None = None

    async def __aenter__(self) -> MeshClient:
        try:
            self.nc = await nats.connect(
                self.settings.nats_url, connect_timeout=3, max_reconnect_attempts=3, error_cb=_log_nats_error
            )
        except Exception as exc:  # nats-py raises several unrelated types for "no server"
            raise ConnectionError(
                f"cannot reach NATS at {self.settings.nats_url} ({exc}). "
                "Start the mesh with `frugalmesh up`, or set NATS_URL to a running one."
            ) from exc
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.nc is not None:
            await self.nc.drain()

    async def submit(self, task: Task) -> None:
        """Publish a task; JetStream drops a second submission with the same idempotency key."""
        if not task.submitted_ms:
            task.submitted_ms = now_ms()
        await self.js.publish(
            self.subjects.task_submit,
            msgspec.json.encode(task),
            stream=self.subjects.stream(STREAM_TASKS),
            headers={HEADER_MSG_ID: task.idempotency_key or task.id},
        )

    async def follow(self, task_id: str, timeout_s: float) -> AsyncIterator[TaskEvent]:
        """Every event of one task from its first, ending after the terminal one."""
        queue: asyncio.Queue[TaskEvent] = asyncio.Queue()

        async def on_event(msg) -> None:
            queue.put_nowait(msgspec.json.decode(msg.data, type=TaskEvent))

        sub = await self.js.subscribe(
            self.subjects.task_event(task_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=on_event
        )
        try:
            while True:
                event = await asyncio.wait_for(queue.get(), timeout_s)
                yield event
                if event.kind in TERMINAL_EVENTS:
                    return
        finally:
            await sub.unsubscribe()

    async def artifact(self, artifact_id: str) -> Artifact:
        reply = await self.nc.request(
            self.subjects.artifact_get, msgspec.json.encode(ArtifactGet(id=artifact_id)), timeout=10
        )
        decoded = msgspec.json.decode(reply.data, type=ArtifactReply)
        if decoded.artifact is None:
            raise LookupError(f"artifact {artifact_id}: {decoded.error}")
        return decoded.artifact

    async def put_artifact(self, artifact: Artifact) -> ArtifactRef:
        """Store an artifact (a task input, say); raises ValueError with the store's reason if refused."""
        reply = await self.nc.request(self.subjects.artifact_put, msgspec.json.encode(artifact), timeout=10)
        decoded = msgspec.json.decode(reply.data, type=ArtifactReply)
        if decoded.ref is None:
            raise ValueError(f"the artifact store refused the {artifact.type!r} artifact: {decoded.error}")
        return decoded.ref
