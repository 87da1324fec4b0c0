"""Records a running mesh's traffic into a replayable JSONL file (``frugalmesh loadtest record``).

It listens, with core subscriptions, to ``<prefix>.task.submit`` (every Task as published),
``<prefix>.usage.>`` (every metered call) and the task events (to know when a task has ended,
so its usage is complete). It never consumes from a stream, so the mesh runs exactly as before.

One line per task, in arrival order::

    {"v": 1, "arrival_ms": 0, "input_tokens": 812, "output_tokens": 44,
     "prefix_hashes": ["9f1c...", ...], "tenant": "acme", "workflow": "answer", "calls": 1}

``input_tokens`` is the goal's length in cl100k tokens (the text itself is not kept: recordings
hold sizes, like the public traces). ``prefix_hashes`` name the goal's 512-token blocks by a hash
of the whole prefix up to the block's end, so two goals with the same first k blocks share their
first k hashes, which replay turns into the same first k blocks of text. ``output_tokens`` is the
task's max_tokens when it set one, else the most output tokens any of its calls produced (null
when it made no call: the replayed task then uses its workflow's max_tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats

from loadtest.prompts import BLOCK_TOKENS
from loadtest.replay import ENDINGS
from loadtest.traces import RECORDING_VERSION
from schemas.messages import Task, TaskEvent, UsageEvent
from services.runtime.settings import MeshSettings
from services.runtime.tokens import tokenizer

PROMPT_TOKENIZER = "cl100k"


@dataclass
class _Seen:
    task: Task
    arrived: float  # monotonic
    calls: int = 0
    max_output_tokens: int = 0
    ended: bool = False


@dataclass
class Recorder:
    settings: MeshSettings
    tasks: dict[str, _Seen] = field(default_factory=dict)

    async def record(self, duration_s: float | None, stop: asyncio.Event | None = None, grace_s: float = 30.0) -> None:
        """Listen until ``duration_s`` passes or ``stop`` is set, then up to ``grace_s`` more for
        the recorded tasks to end (their usage is not complete before)."""
        subjects = self.settings.subjects
        nc = await nats.connect(
            self.settings.nats_servers, connect_timeout=3, max_reconnect_attempts=3, **self.settings.nats_options()
        )
        try:
            submits = await nc.subscribe(subjects.task_submit_all, cb=self._on_task)
            await nc.subscribe(subjects.usage_all, cb=self._on_usage)
            await nc.subscribe(subjects.task_events, cb=self._on_event)
            await nc.flush()
            waiting: list[asyncio.Task[object]] = [
                asyncio.create_task(asyncio.sleep(duration_s if duration_s is not None else 1e9))
            ]
            if stop is not None:
                waiting.append(asyncio.create_task(stop.wait()))
            _, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await submits.unsubscribe()
            deadline = time.monotonic() + grace_s
            while not all(seen.ended for seen in self.tasks.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await nc.drain()

    async def _on_task(self, msg) -> None:
        try:
            task = msgspec.json.decode(msg.data, type=Task)
        except msgspec.DecodeError:
            return  # the planner dead-letters it; it is not traffic to replay
        # A resubmission with the same id is one task (JetStream de-duplicates it too).
        self.tasks.setdefault(task.id, _Seen(task, arrived=time.monotonic()))

    async def _on_usage(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=UsageEvent)
        seen = self.tasks.get(event.task_id)
        if seen is not None:
            seen.calls += 1
            seen.max_output_tokens = max(seen.max_output_tokens, event.output_tokens)

    async def _on_event(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=TaskEvent)
        seen = self.tasks.get(event.task_id)
        if seen is not None and event.kind in ENDINGS:
            seen.ended = True

    def write(self, out: Path) -> int:
        """Write the recording; return how many tasks it holds."""
        seen = sorted(self.tasks.values(), key=lambda s: s.arrived)
        first = seen[0].arrived if seen else 0.0
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for s in seen:
                f.write(json.dumps(recording_line(s, first)) + "\n")
        return len(seen)


def prefix_hashes(text: str) -> tuple[int, list[str]]:
    """The text's cl100k token count and one hash per 512-token block, each of the whole prefix so far."""
    ids = tokenizer(PROMPT_TOKENIZER).encode(text)
    hasher = hashlib.sha256()
    hashes = []
    for start in range(0, len(ids), BLOCK_TOKENS):
        hasher.update(b"".join(i.to_bytes(4, "little") for i in ids[start : start + BLOCK_TOKENS]))
        hashes.append(hasher.copy().hexdigest()[:16])
    return len(ids), hashes


def recording_line(seen: _Seen, first: float) -> dict:
    task = seen.task
    input_tokens, hashes = prefix_hashes(task.goal)
    output_tokens = task.max_tokens or seen.max_output_tokens or None
    return {
        "v": RECORDING_VERSION,
        "arrival_ms": round((seen.arrived - first) * 1000, 3),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "prefix_hashes": hashes,
        "tenant": task.tenant,
        "workflow": task.workflow,
        "calls": seen.calls,
    }
