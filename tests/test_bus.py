"""The Bus, every service's one way to NATS: typed rejections, bucket declaration, pipelined publishes."""

import msgspec
import pytest
from nats.aio.msg import Msg

from schemas.messages import ArtifactGet, ArtifactReply, Rejection
from schemas.subjects import STREAM_DLQ
from services.runtime.bus import Bus, Rejected

pytestmark = pytest.mark.infra


async def answer_with(bus: Bus, subject: str, reply: bytes) -> None:
    async def respond(msg: Msg) -> None:
        await msg.respond(reply)

    await bus.subscribe_core(subject, respond)
    await bus.flush()


async def test_a_rejection_is_raised_as_rejected_with_its_reason(bus, settings):
    subject = f"{settings.subject_prefix}.rejects"
    await answer_with(bus, subject, Bus.rejection("not an ArtifactGet", "invalid"))
    with pytest.raises(Rejected) as raised:
        await bus.request(subject, ArtifactGet(id="x"), ArtifactReply, timeout_s=5)
    assert (raised.value.error.kind, raised.value.error.message) == ("invalid", "not an ArtifactGet")
    # The wire form is the exported schema type, readable by any client.
    decoded = msgspec.json.decode(Bus.rejection("why", "refused", retryable=True), type=Rejection)
    assert (decoded.error.kind, decoded.error.message, decoded.error.retryable) == ("refused", "why", True)


async def test_a_reply_that_is_neither_the_type_nor_a_rejection_is_a_decode_error(bus, settings):
    subject = f"{settings.subject_prefix}.garbage"
    await answer_with(bus, subject, b'{"artifact": 5}')
    with pytest.raises(msgspec.ValidationError):
        await bus.request(subject, ArtifactGet(id="x"), ArtifactReply, timeout_s=5)


async def test_the_reply_type_is_returned_when_it_decodes(bus, settings):
    subject = f"{settings.subject_prefix}.answers"
    await answer_with(bus, subject, msgspec.json.encode(ArtifactReply(error="not found")))
    reply = await bus.request(subject, ArtifactGet(id="x"), ArtifactReply, timeout_s=5)
    assert reply == ArtifactReply(error="not found")


async def test_a_bucket_is_created_once_and_an_existing_one_is_kept_as_it_is(bus, settings):
    name = settings.subjects.bucket("declared")
    created = await bus.key_value(name, history=5)
    await created.put("k", b"v")
    # Another process declares it with other settings: it gets the bucket as it exists.
    other = Bus(settings, "other")
    await other.connect()
    try:
        again = await other.key_value(name, history=1)
        assert (await again.get("k")).value == b"v"
        assert (await again.status()).history == 5
    finally:
        await other.close()
    assert await bus.key_value(name) is created  # cached per process


async def test_pipelined_publishes_are_stored_in_order(bus, settings):
    await bus.declare_streams()
    stream = settings.subjects.stream(STREAM_DLQ)
    subject = settings.subjects.dlq("bus-test")
    acks = [await bus.publish_pipelined(subject, ArtifactGet(id=str(i)), stream=stream) for i in range(20)]
    sequences = [(await ack).seq for ack in acks]
    assert sequences == sorted(sequences) and len(set(sequences)) == 20
