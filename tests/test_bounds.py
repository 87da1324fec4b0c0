"""Every wire field has a bound, a value past it is refused with the field and the bound named, and a
bad message near NATS's payload limit still reaches the dead-letter subject, cut down with its size
(issue 16, item 6). The bounds live in schemas/messages.py (``Id``, ``Text``, ``TimeMs``, ``Usd``, ...)."""

from __future__ import annotations

import msgspec
import pytest
from helpers import make_step
from msgspec import inspect as types

from schemas.messages import (
    MAX_ID,
    MAX_ITEMS,
    WIRE_MESSAGES,
    Artifact,
    DeadLetter,
    KillSwitch,
    Rejection,
    Reservation,
    Task,
)
from schemas.subjects import HEADER_TASK, STREAM_DLQ, token
from services.runtime.dead_letters import fit

# Fields deliberately without a bound of their own: an int64 seed (the type bounds it), and a dead
# letter's bytes (what the service received, which NATS's payload limit bounds and ``fit`` cuts down).
UNBOUNDED = {"ChatOptions.seed", "DeadLetter.data"}


def _unbounded(info: types.Type, path: str, seen: set[type]) -> list[str]:
    """The paths under ``info`` whose values have no bound."""
    if isinstance(info, types.Metadata):
        info = info.type
    if isinstance(info, types.StructType):
        if info.cls in seen:
            return []
        seen.add(info.cls)
        return [p for f in info.fields for p in _unbounded(f.type, f"{info.cls.__name__}.{f.name}", seen)]
    if isinstance(info, types.UnionType):
        return [p for member in info.types for p in _unbounded(member, path, seen)]
    if path in UNBOUNDED or isinstance(info, types.LiteralType | types.BoolType | types.NoneType):
        return []
    if isinstance(info, types.StrType):
        return [] if info.max_length is not None else [path]
    if isinstance(info, types.IntType | types.FloatType):
        low = info.ge is not None or info.gt is not None
        high = info.le is not None or info.lt is not None
        return [] if low and high else [path]
    if isinstance(info, types.ListType):
        return ([] if info.max_length is not None else [path]) + _unbounded(info.item_type, f"{path}[]", seen)
    if isinstance(info, types.DictType):
        inner = _unbounded(info.key_type, f"{path}{{key}}", seen) + _unbounded(info.value_type, f"{path}{{}}", seen)
        return ([] if info.max_length is not None else [path]) + inner
    if isinstance(info, types.AnyType):
        return []  # a JSON object's values (JsonObject): its keys are bounded, its nesting by the decoder's stack
    return [path]


@pytest.mark.unit
def test_every_field_of_every_wire_message_has_a_bound():
    seen: set[type] = set()
    unbounded = [p for message in WIRE_MESSAGES for p in _unbounded(types.type_info(message), message.__name__, seen)]
    assert unbounded == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("message_type", "data", "error"),
    [
        (Task, {"id": "x" * (MAX_ID + 1)}, f"Expected `str` of length <= {MAX_ID} - at `$.id`"),
        (Task, {"id": "t", "deadline_s": 0}, "Expected `float` > 0.0 - at `$.deadline_s`"),
        (Task, {"id": "t", "max_tokens": 0}, "Expected `int` >= 1 - at `$.max_tokens`"),
        (Task, {"id": "t", "budget_usd": -1.0}, "Expected `float` >= 0.0 - at `$.budget_usd`"),
        (KillSwitch, {"scope": "global", "tripped": True, "time_ms": -1}, "Expected `int` >= 0 - at `$.time_ms`"),
        (
            Artifact,
            {"type": "answer", "body": {}, "parents": ["p"] * (MAX_ITEMS + 1)},
            f"Expected `array` of length <= {MAX_ITEMS} - at `$.parents`",
        ),
        (
            Reservation,
            {"id": "r", "tenant": "t", "task_id": "t", "model": "m", "amount_usd": 2e9, "expires_ms": 1},
            "Expected `float` <= 1000000000.0 - at `$.amount_usd`",
        ),
    ],
)
def test_a_value_past_its_bound_is_refused_naming_the_field_and_the_bound(message_type, data, error):
    with pytest.raises(msgspec.ValidationError) as refused:
        msgspec.json.decode(msgspec.json.encode(data), type=message_type)
    assert str(refused.value) == error


@pytest.mark.unit
def test_infinity_is_out_of_range_of_every_amount():
    data = b'{"id":"r","tenant":"t","task_id":"t","model":"m","amount_usd":1e999,"expires_ms":1}'
    with pytest.raises(msgspec.ValidationError, match=r"out of range - at `\$.amount_usd`"):
        msgspec.json.decode(data, type=Reservation)


@pytest.mark.unit
def test_a_subject_token_is_bounded_too():
    assert token("a" * MAX_ID) == "a" * MAX_ID
    with pytest.raises(ValueError, match=f"longer than {MAX_ID} characters"):
        token("a" * (MAX_ID + 1))


@pytest.mark.unit
def test_a_dead_letter_of_a_message_past_the_payload_limit_fits_and_says_its_size():
    room = 1024 * 1024 - 1024
    data = b"\x00" * (3 * 1024 * 1024)
    letter = DeadLetter(
        service="s", subject="x", error="e" * 10_000, data=data, headers={"h": "v" * 700_000}, time_ms=1
    )

    encoded = fit(letter, room)

    assert len(encoded) <= room
    kept = msgspec.json.decode(encoded, type=DeadLetter)
    assert data.startswith(kept.data) and 0 < len(kept.data) < len(data)
    assert kept.headers == {}
    assert kept.error.endswith(
        f"(dead letter truncated: the first {len(kept.data)} of {len(data)} bytes kept, its headers dropped)"
    )


# -- on a real nats-server --


@pytest.mark.infra
async def test_a_step_past_a_bound_is_rejected_and_dead_lettered_with_the_field_named(settings, start_service, nc):
    await start_service("router", settings)
    step = msgspec.to_builtins(make_step("Hi"))
    step["tenant"] = "t" * (MAX_ID + 1)
    data = msgspec.json.encode(step)

    reply = await nc.request(settings.subjects.step_request, data, timeout=5)

    rejection = msgspec.json.decode(reply.data, type=Rejection)
    assert rejection.error.kind == "invalid"
    letter = await _letter(nc, settings)
    assert letter.data == data
    assert letter.error == f"StepRequest: Expected `str` of length <= {MAX_ID} - at `$.tenant`"


@pytest.mark.infra
async def test_a_bad_message_with_headers_near_the_payload_limit_is_dead_lettered_cut_down(settings, start_service, nc):
    await start_service("cloud-inference", settings)
    body = b"{" + b"x" * 300_000
    headers = {HEADER_TASK: "h" * (nc.max_payload - len(body) - 20_000)}

    reply = await nc.request(settings.subjects.infer_cloud("openai"), body, headers=headers, timeout=10)

    assert msgspec.json.decode(reply.data, type=Rejection).error.kind == "invalid"
    letter = await _letter(nc, settings)
    assert (letter.service, letter.headers) == ("cloud-inference", {})
    assert body.startswith(letter.data) and letter.data
    assert f"the first {len(letter.data)} of {len(body)} bytes kept, its headers dropped)" in letter.error


async def _letter(nc, settings) -> DeadLetter:
    """The one dead letter on this test's prefix."""
    js = nc.jetstream()
    name = settings.subjects.stream(STREAM_DLQ)
    info = await js.stream_info(name)
    assert info.state.messages == 1
    return msgspec.json.decode((await js.get_msg(name, info.state.first_seq)).data, type=DeadLetter)
