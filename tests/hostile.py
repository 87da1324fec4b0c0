"""Hostile payloads for the fuzz tests (tests/test_fuzz.py): hypothesis strategies that turn one valid
message into what a broken or malicious client sends instead.

Each payload is bytes as they would arrive on the wire, of one of these kinds:

- random bytes; valid JSON of any shape (a list, a number, an object of unknown keys);
- the valid message with one field, at any depth, replaced by a hostile value: another JSON type,
  a huge string, a number out of every range (negative, 2**64, ``1e999``, which JSON readers take
  as infinity), a lone surrogate escape, or nesting thousands of levels deep;
- the valid message with unknown fields added (it must still be read: unknown fields are ignored);
- the valid message cut short, or encoded as msgpack instead of JSON;
- the valid message itself, so the property also covers what a service accepts.

``counts`` stands in for a stored plain count (ASCII digits) instead: numbers of any sign and size,
bytes, JSON, and near misses (a sign, a space, an Arabic-Indic digit, which ``int`` reads).

``decodes`` is the oracle: whether the mesh's schema (schemas/messages.py, bounds included) reads a
payload as the message type. Nothing here talks to a server.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import strategies as st

from schemas.subjects import HEADER_BUDGET, HEADER_DEADLINE, HEADER_SCHEDULE_RUN, HEADER_TASK, HEADER_TENANT

# Strings far past any id or name bound, and one near the server's default payload limit (1 MiB).
HUGE_LENGTHS = (5_000, 300_000, 900_000)
# Nesting a JSON reader walks easily, one past Python's recursion limit, and one far past it.
DEPTHS = (50, 1_500, 20_000)
RAW_NUMBERS = (b"1e999", b"-1e999", b"-0.0", b"1e-400", b"18446744073709551616", b"-9223372036854775809")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _nested(depth: int, in_objects: bool) -> msgspec.Raw:
    return msgspec.Raw(b'{"a":' * depth + b"1" + b"}" * depth if in_objects else b"[" * depth + b"]" * depth)


hostile_values = st.one_of(
    json_values,
    st.sampled_from(HUGE_LENGTHS).map(lambda n: "x" * n),
    st.sampled_from(RAW_NUMBERS).map(msgspec.Raw),
    st.sampled_from((-1, 0, -(2**63), 2**63, 2**64, 1e308, -1e308, 5e-324)),
    st.just(msgspec.Raw(b'"\\ud800"')),
    st.builds(_nested, st.sampled_from(DEPTHS), st.booleans()),
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value a field could be replaced: each object key and list item, at any depth."""
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_paths(item, (*path, index)))
    return found


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replaced(copy[head], rest, new)
    return copy


@st.composite
def _one_field_hostile(draw: st.DrawFn, example: dict[str, Any]) -> bytes:
    path = draw(st.sampled_from(_paths(example)))
    return msgspec.json.encode(_replaced(example, path, draw(hostile_values)))


@st.composite
def _unknown_fields(draw: st.DrawFn, example: dict[str, Any]) -> bytes:
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=12), hostile_values, min_size=1, max_size=3))
    return msgspec.json.encode({**extra, **example})


@st.composite
def _truncated(draw: st.DrawFn, example: dict[str, Any]) -> bytes:
    encoded = msgspec.json.encode(example)
    return encoded[: draw(st.integers(min_value=0, max_value=len(encoded) - 1))]


def payloads(example: msgspec.Struct) -> st.SearchStrategy[bytes]:
    """Hostile payloads built around ``example``, a valid message of the type a subject takes."""
    fields: dict[str, Any] = msgspec.to_builtins(example)
    return st.one_of(
        st.binary(max_size=512),
        json_values.map(msgspec.json.encode),
        _one_field_hostile(fields),
        _one_field_hostile(fields),
        _one_field_hostile(fields),
        _unknown_fields(fields),
        _truncated(fields),
        st.just(msgspec.msgpack.encode(example)),
        st.just(msgspec.json.encode(example)),
    )


# Stored counters that hold a plain count (the planner's attempts: ASCII digits): what else a writer leaves.
counts = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: str(n).encode()),
    st.binary(max_size=64),
    json_values.map(msgspec.json.encode),
    st.sampled_from((b"", b" 1", b"1\n", b"+1", b"1_0", b"0x10", "\u0661".encode(), b"1" * 5_000, *RAW_NUMBERS)),
)

# Header values a hostile sender sets on the mesh's own headers (printable, as NATS requires of them).
header_values = st.one_of(
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    st.sampled_from(("-1", "NaN", "inf", "1e999", "0", "", " ")),
)
headers = st.none() | st.dictionaries(
    st.sampled_from((HEADER_BUDGET, HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT, HEADER_SCHEDULE_RUN, "traceparent")),
    header_values,
    max_size=3,
)


def decodes(payload: bytes, message_type: type[msgspec.Struct]) -> bool:
    """Whether the mesh's schema reads ``payload`` as ``message_type``."""
    try:
        msgspec.json.decode(payload, type=message_type)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True
