"""Every current value of a KV bucket, read in full before a service goes on.

A reader opens a watch and reads the last value of every key, then follows changes. nats-py's
watcher says it has caught up by putting None in its queue, and decides when by comparing the
consumer's pending count with the messages its own callback has handed over. When the server has
already sent the values but the callback has not run yet, both are 0 and the marker comes first: a
reader that stops at it misses every value behind it (tests/test_fuzz.py's budget test, run with
FRUGALMESH_FUZZ_EXAMPLES=200, found it as a run-time cap the accountant did not load at start, about
once a run). So ``current_entries`` counts instead: the bucket's stream says how many keys have a
last value (a deletion marker included), and it reads until it has seen that many keys.

Assumes the watch delivers deletion markers (``watchall()``'s default). A key written after the
count is taken comes through the watch like any later change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from nats.js.kv import KeyValue

from services.runtime.bus import Bus


async def current_entries(
    bus: Bus, bucket: str, watcher: KeyValue.KeyWatcher, timeout_s: float
) -> AsyncIterator[KeyValue.Entry]:
    """The last entry of every key of ``bucket`` (its full name), from ``watcher``, a ``watchall()``
    opened before this is called; raises nats-py's TimeoutError if one takes over ``timeout_s``."""
    info = await bus.jetstream.stream_info(f"KV_{bucket}", subjects_filter=">")
    expected = len(info.state.subjects or {})
    seen: set[str] = set()
    while len(seen) < expected:
        entry = await watcher.updates(timeout=timeout_s)  # type: ignore[no-untyped-call]
        if entry is not None:  # the caught-up marker, possibly early
            seen.add(entry.key)
            yield entry
