"""What the outbox costs a metered call (services/runtime/outbox.py), next to a bare JetStream publish.

``python -m loadtest.bench.outbox [--json]`` starts its own nats-server and times, one event at a
time, in alternating rounds on one connection:

- ``bare_publish``: nats-py's JetStream publish of a usage event with its ``Nats-Msg-Id`` (what
  ``Bus.publish_usage`` did before the outbox, when the first try was acknowledged);
- ``publish_usage``: ``Bus.publish_usage`` on a healthy server (the outbox's hot path: the same
  publish, the file never touched);
- ``outbox_append``: ``Bus.publish_usage`` while the usage stream is missing (JetStream answers
  "no responders" at once), so every event is written to the outbox file, synced: the failure
  path, and about what writing every event to disk first would add to every call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from schemas.messages import UsageEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_USAGE
from services.embedded.servers import EmbeddedNats
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.settings import MeshSettings

EVENTS = 1_000
ROUNDS = 5


def usage_event(event_id: str) -> UsageEvent:
    return UsageEvent(
        event_id=event_id, time_ms=now_ms(), tenant="bench", task_id="t", call_id=event_id,
        service="cloud-inference", tier="mid", provider="together", model="mixtral-8x7b",
        requested_model="mixtral-8x7b", input_tokens=512, output_tokens=64, cost_usd=0.0003, outcome="ok",
    )  # fmt: skip


async def timed(publish: Callable[[UsageEvent], Awaitable[None]], tag: str) -> list[float]:
    """Microseconds per publish of ``EVENTS`` fresh events."""
    times = []
    for i in range(EVENTS):
        event = usage_event(f"{tag}-{i}")
        started = time.perf_counter()
        await publish(event)
        times.append((time.perf_counter() - started) * 1e6)
    return times


async def run(home: Path, url: str) -> dict[str, float]:
    settings = MeshSettings(nats_url=url, subject_prefix="bo" + uuid.uuid4().hex[:8], home=home, log_level="ERROR")
    bus = Bus(settings, "bench")
    await bus.connect()
    try:
        appended = []
        for round_ in range(ROUNDS):  # the stream not declared yet: every event goes to the file
            appended += await timed(bus.publish_usage, f"append{round_}")
            await bus.outbox.stop()  # what was appended stays on disk; the next round appends behind it
        await bus.declare_streams()
        bus.outbox.start()  # sends what the rounds above left
        while any(bus.outbox.waiting().values()):
            await asyncio.sleep(0.1)
        stream = settings.subjects.stream(STREAM_USAGE)

        async def bare(event: UsageEvent) -> None:
            subject, headers = settings.subjects.usage(event.tenant), {HEADER_MSG_ID: event.event_id}
            await bus.jetstream.publish(subject, encode(event), stream=stream, headers=headers)

        times: dict[str, list[float]] = {"bare_publish": [], "publish_usage": []}
        for round_ in range(ROUNDS):
            times["bare_publish"] += await timed(bare, f"bare{round_}")
            times["publish_usage"] += await timed(bus.publish_usage, f"usage{round_}")
        times["outbox_append"] = appended
    finally:
        await bus.close()
    result: dict[str, float] = {}
    for name, values in times.items():
        ordered = sorted(values)
        p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
        result |= {f"{name}_p50_us": round(p50, 1), f"{name}_p99_us": round(p99, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="What the outbox costs a metered call.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    server = EmbeddedNats(tmp / "nats", port=-1)
    server.start()
    try:
        result = asyncio.run(run(tmp / "home", server.url))
    finally:
        server.stop()
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
