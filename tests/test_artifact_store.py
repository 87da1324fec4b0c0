"""artifact-store over a real nats-server, driven by a plain nats-py client as any agent would."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from mesh_client import get_artifact, put_artifact

from schemas.artifacts import artifact_id
from schemas.messages import Artifact, DeadLetter
from schemas.subjects import BUCKET_ARTIFACT_BODIES, BUCKET_ARTIFACT_INDEX, STREAM_ARTIFACT_EVENTS, STREAM_DLQ

pytestmark = pytest.mark.infra


def answer(text: str = "42", **fields) -> Artifact:
    return Artifact(
        type="answer",
        task_id="t1",
        step_id="draft",
        calls=["c1"],
        parents=["p" * 64],
        body={"text": text, "model": "mixtral-8x7b-local", **fields},
        cost_usd=0.0012,
    )


async def test_put_get_roundtrip_stores_body_index_and_announces(settings, start_service, nc):
    await start_service("artifact-store", settings)
    js = nc.jetstream()
    created = await js.subscribe(
        settings.subjects.artifact_created("answer"), stream=settings.subjects.stream(STREAM_ARTIFACT_EVENTS)
    )

    reply = await put_artifact(nc, settings, answer())
    assert reply.error is None and reply.ref is not None
    assert reply.ref.type == "answer"
    # The id is the content address of the tenant and the normalised body (the omitted `graded`
    # defaults to null; the tenant left out is the default one).
    body = {"text": "42", "model": "mixtral-8x7b-local", "graded": None}
    assert reply.ref.id == artifact_id("default", "answer", 1, body)

    got = await get_artifact(nc, settings, reply.ref.id)
    assert got.error is None and got.artifact is not None
    stored = got.artifact
    assert (stored.id, stored.type, stored.body) == (reply.ref.id, "answer", body)
    assert (stored.task_id, stored.step_id, stored.calls, stored.parents) == ("t1", "draft", ["c1"], ["p" * 64])
    assert stored.cost_usd == 0.0012 and stored.created_ms > 0

    # Body in the Object Store, metadata (no body) in the KV index, both under the id.
    bodies = await js.object_store(settings.subjects.bucket(BUCKET_ARTIFACT_BODIES))
    assert msgspec.json.decode((await bodies.get(reply.ref.id)).data) == body
    index = await js.key_value(settings.subjects.bucket(BUCKET_ARTIFACT_INDEX))
    metadata = msgspec.json.decode((await index.get(reply.ref.id)).value)
    assert "body" not in metadata and (metadata["task_id"], metadata["tenant"]) == ("t1", "default")

    event = await created.next_msg(timeout=5)
    announced = msgspec.json.decode(event.data, type=Artifact)
    assert announced.id == reply.ref.id and announced.body == body
    await created.unsubscribe()


async def test_same_body_twice_gives_same_id_and_one_announcement(settings, start_service, nc):
    await start_service("artifact-store", settings)
    first = await put_artifact(nc, settings, answer("7"))
    # Different task and lineage, same content: same artifact.
    elsewhere = msgspec.structs.replace(answer("7", graded=None), task_id="t2", calls=["c9"])
    second = await put_artifact(nc, settings, elsewhere)
    assert first.ref == second.ref
    got = await get_artifact(nc, settings, first.ref.id)
    assert got.artifact.task_id == "t1"  # the first put's metadata stays: artifacts never change

    js = nc.jetstream()
    info = await js.stream_info(settings.subjects.stream(STREAM_ARTIFACT_EVENTS))
    assert info.state.messages == 1


async def test_concurrent_puts_are_all_answered(settings, start_service, nc):
    await start_service("artifact-store", settings)
    replies = await asyncio.gather(*(put_artifact(nc, settings, answer(str(i % 5))) for i in range(40)))
    assert all(r.error is None for r in replies)
    assert len({r.ref.id for r in replies}) == 5
    info = await nc.jetstream().stream_info(settings.subjects.stream(STREAM_ARTIFACT_EVENTS))
    assert info.state.messages == 5


async def test_a_burst_of_reads_and_a_body_of_many_chunks_are_all_answered(settings, start_service, nc):
    """Reads of one-chunk bodies take no JetStream consumer: through nats-py's ObjectStore.get, each
    did, and a burst of 2,000 had some refused ("maximum consumers limit reached"). A body longer than
    a chunk (128 KiB) is still read whole."""
    await start_service("artifact-store", settings)
    small = (await put_artifact(nc, settings, answer("small"))).ref
    large_text = "x" * 300_000
    large = (await put_artifact(nc, settings, answer(large_text))).ref
    reads = await asyncio.gather(*(get_artifact(nc, settings, small.id) for _ in range(2000)))
    assert all(r.artifact is not None and r.artifact.body["text"] == "small" for r in reads)
    assert (await get_artifact(nc, settings, large.id)).artifact.body["text"] == large_text


async def test_invalid_body_is_refused_with_reason_and_dead_lettered(settings, start_service, nc):
    await start_service("artifact-store", settings)
    js = nc.jetstream()
    dlq = await js.subscribe(settings.subjects.dlq("artifact-store"), stream=settings.subjects.stream(STREAM_DLQ))

    missing = await put_artifact(nc, settings, Artifact(type="answer", body={"model": "m"}))
    assert missing.ref is None and "invalid 'answer' body" in missing.error and "text" in missing.error

    maybe = Artifact(type="review", body={"text": "x", "model": "m", "verdict": "maybe"})
    bad_verdict = await put_artifact(nc, settings, maybe)
    assert bad_verdict.ref is None and "verdict" in bad_verdict.error

    extra = await put_artifact(nc, settings, Artifact(type="text", body={"text": "x", "surprise": 1}))
    assert extra.ref is None and "surprise" in extra.error

    letter = msgspec.json.decode((await dlq.next_msg(timeout=5)).data, type=DeadLetter)
    assert letter.subject == settings.subjects.artifact_put("default") and "text" in letter.error
    await dlq.unsubscribe()

    # The service goes on.
    assert (await put_artifact(nc, settings, answer())).ref is not None


async def test_unknown_type_and_version_are_refused(settings, start_service, nc):
    await start_service("artifact-store", settings)
    unknown = await put_artifact(nc, settings, Artifact(type="poem", body={"text": "roses"}))
    assert unknown.ref is None and "unknown artifact type 'poem'" in unknown.error
    future = await put_artifact(nc, settings, Artifact(type="text", schema_version=2, body={"text": "x"}))
    assert future.ref is None and "schema version" in future.error


async def test_get_missing_malformed_and_undecodable(settings, start_service, nc):
    await start_service("artifact-store", settings)
    assert (await get_artifact(nc, settings, "0" * 64)).error == "not found"
    assert "invalid artifact id" in (await get_artifact(nc, settings, "../etc")).error
    # Undecodable requests get the mesh-wide rejection, like every service's.
    reply = msgspec.json.decode(
        (await nc.request(settings.subjects.artifact_put("default"), b"{not json", timeout=5)).data
    )
    assert reply["error"]["kind"] == "invalid" and "not an Artifact" in reply["error"]["message"]
