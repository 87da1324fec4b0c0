"""artifact-store: validates, content-addresses, stores and announces artifacts, each for its tenant.

Bodies live in the JetStream Object Store ``<prefix>_artifacts`` under the artifact id; the rest
of the artifact (tenant, type, task, step, producing calls, parents, cost) lives in the KV bucket
``<prefix>_artifact_index`` under the same id. The KV entry is written last and with ``create``,
so it is the commit point: an id in the index always has its body stored, and when two puts of
the same body race, the first one's metadata stays (an artifact never changes once stored).

An artifact belongs to the tenant it was put for (``Artifact.tenant``, a subject token), and that
tenant is hashed into its id (schemas/artifacts.py ``artifact_id``): the same body put by two
tenants is two artifacts. Puts and gets arrive on the tenant's own subject
(``<prefix>.artifact.{put,get}.<tenant>``, which only that tenant's credential, the services and the
agents may publish on): a put naming another tenant is refused, and a get asks as the subject's
tenant whatever its body says. A get of another tenant's artifact is refused
with the very reply a missing one gets, so a refusal tells nothing about the artifact, not even
that it exists; the store logs it (``artifact_get_other_tenant``) for the operator.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from typing import Any

import msgspec
from faststream import FastStream
from nats.aio.msg import Msg
from nats.js.errors import (
    DigestMismatchError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas.artifacts import ArtifactError, artifact_id, canonical_json, validate_body
from schemas.messages import Artifact, ArtifactGet, ArtifactRef, ArtifactReply
from schemas.subjects import (
    BUCKET_ARTIFACT_BODIES,
    BUCKET_ARTIFACT_INDEX,
    HEADER_MSG_ID,
    STREAM_ARTIFACT_EVENTS,
    object_chunks,
    token,
)
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.serve import RequestServer
from services.runtime.settings import MeshSettings

SERVICE = "artifact-store"
QUEUE = "artifact-store"
# Requests of each kind one replica holds at once, each its own asyncio task (services/runtime/serve.py).
CAPACITY = 2_000

_ARTIFACT_ID = re.compile(r"^[0-9a-f]{64}$")
# The one reply to a get of an id the tenant has no artifact under, missing or another tenant's.
NOT_FOUND = "not found"


class ArtifactStore:
    """The store's logic over a connected bus; ``open()`` must run before ``put``/``get``."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._index: KeyValue | None = None
        self._bodies: ObjectStore | None = None
        self._storing: dict[str, asyncio.Future[None]] = {}

    async def open(self) -> None:
        """Create (or bind to) the KV index and the Object Store of bodies."""
        subjects = self.bus.subjects
        self._index = await self.bus.key_value(subjects.bucket(BUCKET_ARTIFACT_INDEX))
        self._bodies = await self.bus.object_store(subjects.bucket(BUCKET_ARTIFACT_BODIES))

    async def put(self, artifact: Artifact) -> ArtifactReply:
        try:
            token(artifact.tenant)
        except ValueError as exc:
            return ArtifactReply(error=f"invalid tenant: {exc}")
        try:
            body = validate_body(artifact.type, artifact.schema_version, artifact.body)
        except ArtifactError as exc:
            return ArtifactReply(error=str(exc))
        ref = ArtifactRef(
            id=artifact_id(artifact.tenant, artifact.type, artifact.schema_version, body), type=artifact.type
        )
        # Concurrent puts of one body in this replica share one write (an Object Store put of
        # the same name twice at once would leave the loser's chunks orphaned).
        storing = self._storing.get(ref.id)
        if storing is None:
            stored = msgspec.structs.replace(artifact, id=ref.id, body=body, created_ms=artifact.created_ms or now_ms())
            storing = self._storing[ref.id] = asyncio.ensure_future(self._store(stored))
            storing.add_done_callback(lambda _: self._storing.pop(ref.id, None))
        await asyncio.shield(storing)
        return ArtifactReply(ref=ref)

    async def _store(self, artifact: Artifact) -> None:
        assert self._index is not None and self._bodies is not None, "ArtifactStore.open() was not awaited"
        try:
            await self._index.get(artifact.id)
            return  # already stored: content addressing makes put idempotent
        except KeyNotFoundError:
            pass
        await self._bodies.put(artifact.id, canonical_json(artifact.body))
        try:
            await self._index.create(artifact.id, _metadata(artifact))
        except KeyWrongLastSequenceError:
            return  # another replica's put of the same body won; it announces it
        await self.bus.publish(
            self.bus.subjects.artifact_created(artifact.type),
            artifact,
            stream=self.bus.subjects.stream(STREAM_ARTIFACT_EVENTS),
            headers={HEADER_MSG_ID: artifact.id},
        )

    async def get(self, request: ArtifactGet) -> ArtifactReply:
        assert self._index is not None and self._bodies is not None, "ArtifactStore.open() was not awaited"
        if not _ARTIFACT_ID.match(request.id):
            return ArtifactReply(error=f"invalid artifact id {request.id!r}: expected 64 lowercase hex digits")
        try:
            entry = await self._index.get(request.id)
        except KeyNotFoundError:
            return ArtifactReply(error=NOT_FOUND)
        if entry.value is None:  # deleted or purged by hand
            return ArtifactReply(error=NOT_FOUND)
        metadata: dict[str, Any] = msgspec.json.decode(entry.value)
        if metadata.get("tenant") != request.tenant:
            # Refused after the one lookup a missing id also takes: neither the reply nor its timing
            # tells another tenant's artifact from no artifact.
            self.bus.log.warning("artifact_get_other_tenant", artifact_id=request.id, tenant=request.tenant)
            return ArtifactReply(error=NOT_FOUND)
        stored = await self._body(request.id)
        if stored is None:  # deleted or purged by hand
            return ArtifactReply(error=NOT_FOUND)
        body = msgspec.json.decode(stored)
        return ArtifactReply(artifact=msgspec.convert({**metadata, "body": body}, type=Artifact))


    async def _body(self, artifact_id: str) -> bytes | None:
        """The stored body, None if there is none. A body of one chunk (128 KiB: nearly all) is read by
        its subject, as a KV value is: nats-py's ``ObjectStore.get`` opens an ordered consumer per read,
        and JetStream caps a stream's consumers, so a burst of reads had some refused ("maximum
        consumers limit reached"). A longer body is read that way still; both check the digest."""
        assert self._bodies is not None, "ArtifactStore.open() was not awaited"
        try:
            info = await self._bodies.get_info(artifact_id)
        except ObjectNotFoundError:
            return None
        if info.chunks != 1 or not info.nuid:
            return (await self._bodies.get(artifact_id)).data
        bucket = self.bus.subjects.bucket(BUCKET_ARTIFACT_BODIES)
        try:
            chunk = await self.bus.jetstream.get_msg(f"OBJ_{bucket}", subject=object_chunks(bucket, info.nuid))
        except NotFoundError:  # the chunk purged by hand
            return None
        data = chunk.data or b""
        if f"SHA-256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()}" != info.digest:
            raise DigestMismatchError  # a body changed by hand: a failed request, logged (serve.py)
        return data


def _metadata(artifact: Artifact) -> bytes:
    """The artifact minus its body, for the KV index."""
    fields = msgspec.to_builtins(artifact)
    del fields["body"]
    return msgspec.json.encode(fields)


def create_app(settings: MeshSettings) -> FastStream:
    bus = Bus(settings, SERVICE)
    app = bus.app()
    store = ArtifactStore(bus)
    subjects = settings.subjects

    # Registered after bus.app()'s hook, so the broker is connected; runs before any subscriber starts.
    app.on_startup(store.open)

    # An undecodable request gets the mesh-wide rejection (``{"error": ErrorInfo}``); a decoded
    # one always gets an ArtifactReply, whose ``error`` says why a put or get was refused.
    async def put(msg: Msg) -> bytes:
        artifact = await bus.decode(msg, Artifact)
        if artifact is None:
            return bus.rejection("not an Artifact (dead-lettered with the decode error)")
        put_as = subjects.tenant_of(msg.subject)
        if artifact.tenant != put_as:
            reply = ArtifactReply(error=f"the artifact names tenant {artifact.tenant!r} but was put as {put_as!r}")
        else:
            reply = await store.put(artifact)
        if reply.error:
            # Bad input is kept with its reason like any other (the sender also gets the reason).
            await bus.dead_letter(msg.subject, msg.data, msg.headers, reply.error)
        return encode(reply)

    async def get(msg: Msg) -> bytes:
        request = await bus.decode(msg, ArtifactGet)
        if request is None:
            return bus.rejection("not an ArtifactGet (dead-lettered with the decode error)")
        # The tenant asking is the one whose subject the requester may publish on, whatever the body says.
        request.tenant = subjects.tenant_of(msg.subject)
        return encode(await store.get(request))

    # Plain subscriptions, each request its own task: a put is several JetStream round trips, and a
    # burst of tasks must not queue behind a few worker slots.
    servers = [
        RequestServer(bus, subjects.artifact_put("*"), QUEUE, put, capacity=CAPACITY),
        RequestServer(bus, subjects.artifact_get("*"), QUEUE, get, capacity=CAPACITY),
    ]
    for server in servers:
        app.on_startup(server.start)
        app.on_shutdown(server.stop)
    return app
