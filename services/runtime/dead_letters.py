"""A dead letter that fits in one NATS message, whatever it holds.

A ``DeadLetter`` carries the refused message's bytes as base64, a third larger, so a message near
the server's max payload cannot be kept whole. ``fit`` keeps its first bytes instead, and its
error says so, with the message's size.

``UNREADABLE`` is what reading a message can raise: msgspec's errors, and ``RecursionError`` for
JSON nested deeper than Python's stack, which msgspec raises as it is (even inside a field it would
skip), so every reader of outside bytes catches both.
"""

from __future__ import annotations

import msgspec
from nats.js.kv import KeyValue

from schemas.messages import DeadLetter
from schemas.subjects import KV_API

UNREADABLE = (msgspec.DecodeError, RecursionError)  # a ValidationError is a DecodeError too


def entry_subject(entry: KeyValue.Entry) -> str:
    """The subject a KV entry was written on (``$KV.<bucket>.<key>``): what the dead letter of an
    unreadable value names, so it is found where it was written."""
    return f"{KV_API}.{entry.bucket}.{entry.key}"

# An error that quotes the message is cut too: the note and the first bytes matter more.
MAX_ERROR_CHARS = 2000
# Room for the note "(dead letter truncated: ...)" and JSON framing.
NOTE_CHARS = 200


def fit(letter: DeadLetter, room: int) -> bytes:
    """``letter`` encoded in at most ``room`` bytes, its data and error cut down when it would not fit."""
    encoded = msgspec.json.encode(letter)
    if len(encoded) <= room:
        return encoded
    data = letter.data
    letter.data, letter.error, dropped = b"", letter.error[:MAX_ERROR_CHARS], ""
    if len(msgspec.json.encode(letter)) > room // 2:
        # Headers that fill a letter on their own go too (NATS counts them in its limit).
        letter.headers, dropped = {}, ", its headers dropped"
    # 4 base64 characters per 3 bytes.
    kept = min(len(data), max(0, (room - len(msgspec.json.encode(letter)) - NOTE_CHARS) * 3 // 4))
    letter.data = data[:kept]
    letter.error += f" (dead letter truncated: the first {kept} of {len(data)} bytes kept{dropped})"
    return msgspec.json.encode(letter)
