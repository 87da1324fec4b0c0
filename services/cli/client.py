"""The CLI's mesh client: submit a task, follow its events, put and get artifacts, over the ``Bus``.

A submission's ``Nats-Msg-Id`` is ``<tenant>.<idempotency key or id>`` (``Task.dedupe_id``), so two
tenants' task ids never collide; artifacts are put and read as a tenant's (the task's), and the
store refuses another tenant's as missing."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from types import TracebackType

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.messages import TERMINAL_EVENTS, Artifact, ArtifactGet, ArtifactRef, ArtifactReply, Task, TaskEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_TASK_EVENTS, STREAM_TASKS
from services.runtime.bus import Bus, now_ms
from services.runtime.identities import Identity
from services.runtime.settings import MeshSettings

REQUEST_TIMEOUT_S = 10.0
# How often a follower reads the task's stored ending while it waits (a live event missed in a reconnect).
STORED_POLL_S = 2.0


def new_task_id() -> str:
    return uuid.uuid4().hex


class MeshClient:
    """``async with MeshClient(settings) as client``: a connected ``Bus`` (``client.bus``) that gives up
    after a few attempts with a ``ConnectionError`` saying how to start a mesh, as a command should."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.bus = Bus(settings, "cli", reconnect_attempts=3, connect_timeout_s=3)
        # nats-py logs a traceback per failed attempt; a command reports the outcome once.
        logging.getLogger("frugalmesh.cli").setLevel(logging.CRITICAL)

    async def __aenter__(self) -> MeshClient:
        try:
            await self.bus.connect()
        except Exception as exc:  # nats-py raises several unrelated types for "no server"
            raise ConnectionError(
                f"cannot reach NATS at {self.settings.nats_url} ({exc}). "
                "Start the mesh with `frugalmesh up`, or set NATS_URL to a running one."
            ) from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.bus.close()

    async def submit(self, task: Task) -> None:
        """Publish a task; JetStream drops a second submission of its tenant with the same idempotency key.
        ValueError when this client's credential is another tenant's (the server would refuse it)."""
        self._check_tenant(task.tenant)
        if not task.submitted_ms:
            task.submitted_ms = now_ms()
        await self.bus.publish(
            self.subjects.task_submit(task.tenant),
            task,
            stream=self.subjects.stream(STREAM_TASKS),
            headers={HEADER_MSG_ID: task.dedupe_id()},
        )

    def _check_tenant(self, tenant: str) -> None:
        """Say it plainly when this client's credential is another tenant's: the server would only refuse
        the publish, and the request would time out."""
        creds = self.settings.nats_creds
        identity = Identity.of_file(creds) if creds else None
        if identity is not None and identity.kind == "tenant" and identity.name != tenant:
            raise ValueError(f"this credential ({creds}) is tenant {identity.name!r}'s: use --tenant {identity.name}")

    async def follow(self, task: Task, timeout_s: float) -> AsyncIterator[TaskEvent]:
        """Subscribe to one task's events, before submitting it (progress events are live only), and
        return them as they come, ending after the terminal one. The terminal event is also read from
        the stream, which keeps it (every ``STORED_POLL_S``, in case a live one was missed while the
        connection was down): a task that ended before this subscribed still ends here, with its
        history in place of the live events."""
        self._check_tenant(task.tenant)
        queue: asyncio.Queue[TaskEvent] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            queue.put_nowait(msgspec.json.decode(msg.data, type=TaskEvent))

        subject = self.subjects.task_events_of(task.tenant, task.id)
        subscription = await self.bus.subscribe_core(subject, on_event)
        await self.bus.flush()
        stream = self.subjects.stream(STREAM_TASK_EVENTS)

        async def read_stored() -> None:
            while True:
                try:
                    stored = await self.bus.last_stored(stream, subject)
                except (nats.errors.Error, TimeoutError) as exc:  # a reconnect, a slow server: asked again
                    self.bus.log.warning("stored_ending_unread", task_id=task.id, error=str(exc))
                    stored = None
                if stored is not None:
                    queue.put_nowait(msgspec.json.decode(stored, type=TaskEvent))
                    return
                await asyncio.sleep(STORED_POLL_S)

        return _until_terminal(queue, subscription, asyncio.create_task(read_stored()), timeout_s)

    async def artifact(self, artifact_id: str, tenant: str) -> Artifact:
        """``tenant``'s artifact ``artifact_id`` (the tenant of the task that made it); LookupError when
        there is none (another tenant's reads as none)."""
        request = ArtifactGet(id=artifact_id, tenant=tenant)
        reply = await self.bus.request(self.subjects.artifact_get(tenant), request, ArtifactReply, REQUEST_TIMEOUT_S)
        if reply.artifact is None:
            raise LookupError(f"artifact {artifact_id}: {reply.error}")
        return reply.artifact

    async def put_artifact(self, artifact: Artifact) -> ArtifactRef:
        """Store an artifact as its ``tenant``'s (a task input: the submitting task's tenant); raises
        ValueError with the store's reason if refused."""
        self._check_tenant(artifact.tenant)
        reply = await self.bus.request(
            self.subjects.artifact_put(artifact.tenant), artifact, ArtifactReply, REQUEST_TIMEOUT_S
        )
        if reply.ref is None:
            raise ValueError(f"the artifact store refused the {artifact.type!r} artifact: {reply.error}")
        return reply.ref


async def _until_terminal(
    queue: asyncio.Queue[TaskEvent], subscription: Subscription, stored: asyncio.Task[None], timeout_s: float
) -> AsyncIterator[TaskEvent]:
    seen_live = False
    try:
        while True:
            event = await asyncio.wait_for(queue.get(), timeout_s)
            if event.kind in TERMINAL_EVENTS:
                if not seen_live:
                    for earlier in event.history:
                        yield earlier
                yield event
                return
            seen_live = True
            yield event
    finally:
        stored.cancel()
        await subscription.unsubscribe()
