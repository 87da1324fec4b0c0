"""Replays trace rows into a mesh as Tasks at their recorded arrival times, then checks nothing was lost.

Each row becomes a Task of the ``answer`` workflow (unless the row or the caller names another):
its goal is a prompt of the recorded input length (``loadtest.prompts``), its ``max_tokens`` the
recorded output length. Tasks are published open loop (each at its own time, never waiting for
an earlier one), so a slow mesh shows up as latency and loss, not as a politely slower client.

The end state of every task is read from its task events (a core subscription while running,
then JetStream's last event per task for any the subscription missed); the accountant's rows in
ClickHouse give backend time, spend and cache hits, and the zero-loss check: every published
task ended, and every call it reports has exactly one usage row.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import clickhouse_connect
import msgspec
import nats
from nats.aio.client import Client
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError

from loadtest.prompts import prompt_text
from loadtest.stats import Percentiles, percentiles
from loadtest.traces import TraceRow
from schemas.messages import TERMINAL_EVENTS, Task, TaskEvent, UsageEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_TASK_EVENTS, STREAM_TASKS
from services.runtime.bus import now_ms
from services.runtime.settings import MeshSettings

# A task has ended once it is terminal, or refused before it started (nothing ran, nothing spent).
ENDINGS: frozenset[str] = TERMINAL_EVENTS | {"refused"}
INFERENCE_SERVICES = ("local-inference", "cloud-inference")
MAX_REASONS = 5
# Tasks whose usage rows do not match their reported calls, named in the zero-loss check.
MISMATCHES_NAMED = 5
# How long the accountant may take to store the last rows after the last task ended.
INGEST_WAIT_S = 30.0
# How long a task's publish is sent again while its stream elects a leader (a nats-server of a cluster lost).
PUBLISH_RETRY_S = 15.0
# Tries per server to reconnect: a cluster's lost server is one of several seeds.
RECONNECTS = 10
# Task ids per usage query (12 hex digits each).
IDS_PER_QUERY = 2_000


@dataclass
class ReplayOptions:
    speed: float = 1.0
    tenant: str = "loadtest"
    workflow: str = "answer"
    deadline_s: float = 300.0
    # Renames every prompt block (loadtest.prompts): a fresh salt shares no text with earlier runs.
    salt: str = ""
    # After the last publish, how long to wait for tasks still running (beyond their deadline).
    drain_s: float = 30.0


@dataclass
class Live:
    """What the progress bar shows, updated as events arrive."""

    total: int
    sent: int = 0
    ended: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in sorted(ENDINGS)})
    publish_errors: int = 0
    spend_usd: float = 0.0

    @property
    def finished(self) -> int:
        return sum(self.ended.values())

    @property
    def in_flight(self) -> int:
        return self.sent - self.finished

    def line(self) -> str:
        e = self.ended
        return (
            f"sent {self.sent}  done {e['done']}  partial {e['partial']}  failed {e['failed'] + e['killed']}  "
            f"refused {e['refused']}  in flight {self.in_flight}  ${self.spend_usd:.4f}"
        )


@dataclass
class _Sent:
    task: Task
    sent_at: float  # monotonic
    ended_at: float | None = None
    event: TaskEvent | None = None
    refused: bool = False

    @property
    def ending(self) -> TaskEvent:
        """The event that ended the task; only for a task that has ended."""
        if self.event is None:
            raise ValueError(f"task {self.task.id} has not ended")
        return self.event


@dataclass(frozen=True)
class ZeroLoss:
    published: int
    ended: int
    missing: int
    calls_reported: int
    usage_rows: int
    tasks_with_row_mismatch: int
    # The first few of those tasks (by id), to look their usage rows up.
    mismatched_tasks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.calls_reported == self.usage_rows and self.tasks_with_row_mismatch == 0


@dataclass(frozen=True)
class Report:
    rows: int
    published: int
    publish_errors: int
    skipped_oversize: int
    outcomes: dict[str, int]
    # Why tasks did not end done: the most common details of their last events, with counts.
    not_done_reasons: dict[str, int]
    wall_s: float
    offered_tasks_per_s: float
    throughput_tasks_per_s: float
    e2e_latency_ms: Percentiles
    mesh_overhead_ms: Percentiles
    backend_ms: Percentiles
    calls: int
    cache_hits: int
    cache_hit_share: float
    # The share of the calls' input tokens the serving engines had cached (prefix caching).
    cached_input_share: float
    spend_usd: float
    zero_loss: ZeroLoss

    def to_json(self) -> dict:
        data = asdict(self)
        data["zero_loss"]["ok"] = self.zero_loss.ok
        return data


class Replayer:
    def __init__(self, settings: MeshSettings, rows: Sequence[TraceRow], options: ReplayOptions) -> None:
        if options.speed <= 0:
            raise ValueError(f"speed must be positive, not {options.speed}")
        self.settings = settings
        self.subjects = settings.subjects
        self.rows = rows
        self.options = options
        self.live = Live(total=len(rows))
        self.sent: dict[str, _Sent] = {}
        self.skipped_oversize = 0
        self._all_ended = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()

    async def run(self, on_tick: Callable[[Live], None] | None = None) -> Report:
        nc = await nats.connect(
            self.settings.nats_servers,
            connect_timeout=3,
            max_reconnect_attempts=RECONNECTS,
            **self.settings.nats_options(),
        )
        try:
            events = await nc.subscribe(self.subjects.task_events, cb=self._on_event)
            usage = await nc.subscribe(self.subjects.usage_all, cb=self._on_usage)
            # The subscriptions must be known to the server before the first task can end.
            await nc.flush()
            ticker = asyncio.create_task(self._tick(on_tick)) if on_tick else None
            started = time.monotonic()
            try:
                await self._publish_all(nc, started)
                await self._wait_for_endings()
            finally:
                if ticker and on_tick:
                    ticker.cancel()
                    on_tick(self.live)
            await events.unsubscribe()
            await usage.unsubscribe()
            await self._recover_missed_endings(nc)
        finally:
            await nc.drain()
        return self._report(started)

    # -- publishing --

    async def _publish_all(self, nc: Client, started: float) -> None:
        js = nc.jetstream()
        stream = self.subjects.stream(STREAM_TASKS)
        first = self.rows[0].arrival_s if self.rows else 0.0
        run_id = uuid.uuid4().hex[:8]
        for index, row in enumerate(self.rows):
            # Built before the wait, not after it: a long prompt takes a millisecond or more to make,
            # which would otherwise delay this send and the handling of every event meanwhile.
            goal = prompt_text(row, row_key=f"{run_id}:{index}", salt=self.options.salt)
            delay = started + (row.arrival_s - first) / self.options.speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = Task(
                id=f"lt{run_id}{index:07d}",
                tenant=row.tenant or self.options.tenant,
                workflow=row.workflow or self.options.workflow,
                goal=goal,
                deadline_s=self.options.deadline_s,
                # A recorded output length of 0 still asks for one token: max_tokens must be positive.
                max_tokens=max(1, row.output_tokens) if row.output_tokens is not None else None,
                submitted_ms=now_ms(),
                # The replay waits only for each task's terminal event (its history times the steps).
                live_progress=False,
            )
            data = msgspec.json.encode(task)
            if len(data) > nc.max_payload:
                # Only the longest prompts of Mooncake's synthetic trace (190k tokens) do not fit a message.
                self.skipped_oversize += 1
                continue
            publish = asyncio.create_task(self._publish(js, stream, task, data))
            self._publishing.add(publish)
            publish.add_done_callback(self._publishing.discard)
        await asyncio.gather(*self._publishing)

    async def _publish(self, js, stream: str, task: Task, data: bytes) -> None:
        entry = _Sent(task, sent_at=time.monotonic())
        self.sent[task.id] = entry
        try:
            await self._publish_through_elections(js, stream, task, data)
        except (MaxPayloadError, nats.errors.Error, TimeoutError):
            # Not in the stream, so no service will ever see it: not published, not lost.
            del self.sent[task.id]
            self.live.publish_errors += 1
            self._check_all_ended()
            return
        self.live.sent += 1

    async def _publish_through_elections(self, js, stream: str, task: Task, data: bytes) -> None:
        """Publish, again while the stream has no leader (a server lost: JetStream elects another within
        seconds) or the acknowledgement is late, for up to ``PUBLISH_RETRY_S``; the task's Nats-Msg-Id
        makes a repeat of a stored one harmless, as for any client."""
        give_up = time.monotonic() + PUBLISH_RETRY_S
        while True:
            try:
                await js.publish(
                    self.subjects.task_submit(task.tenant),
                    data,
                    stream=stream,
                    headers={HEADER_MSG_ID: task.dedupe_id()},
                )
                return
            except (NoStreamResponseError, TimeoutError):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.25)

    # -- what comes back --

    async def _on_event(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=TaskEvent)
        entry = self.sent.get(event.task_id)
        if entry is None or event.kind not in ENDINGS:
            return
        if entry.event is None:
            entry.ended_at = time.monotonic()
            # Live progress is off (live_progress): a refusal shows in the terminal event's history.
            entry.refused = event.kind == "refused" or any(earlier.kind == "refused" for earlier in event.history)
            self.live.ended["refused" if entry.refused else event.kind] += 1
        # A terminal event after a refusal carries the task's final totals; the task stays refused.
        entry.event = event
        self._check_all_ended()

    async def _on_usage(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=UsageEvent)
        if event.task_id in self.sent:
            self.live.spend_usd += event.cost_usd

    def _check_all_ended(self) -> None:
        if self.live.sent + self.live.publish_errors + self.skipped_oversize >= len(self.rows) and all(
            entry.event is not None for entry in self.sent.values()
        ):
            self._all_ended.set()

    async def _wait_for_endings(self) -> None:
        self._check_all_ended()
        # Every task ends by its deadline (plus the planner's own grace); drain_s bounds the wait after that.
        try:
            await asyncio.wait_for(self._all_ended.wait(), self.options.deadline_s + self.options.drain_s)
        except TimeoutError:
            pass

    async def _tick(self, on_tick: Callable[[Live], None]) -> None:
        while True:
            on_tick(self.live)
            await asyncio.sleep(0.1)

    async def _recover_missed_endings(self, nc: Client) -> None:
        """A core subscription can drop events under load (slow consumer); the stream keeps them."""
        js = nc.jetstream()
        stream = self.subjects.stream(STREAM_TASK_EVENTS)
        for entry in self.sent.values():
            if entry.event is not None:
                continue
            event = await self._stored_ending(js, stream, entry.task)
            if event is not None:
                entry.event = event
                # The stored terminal event carries the run's history: a refusal is in it.
                entry.refused = any(earlier.kind == "refused" for earlier in event.history)
                self.live.ended["refused" if entry.refused else event.kind] += 1

    async def _stored_ending(self, js: JetStreamContext, stream: str, task: Task) -> TaskEvent | None:
        """The terminal event the stream kept for ``task``, if any (one subject per terminal kind)."""
        for kind in sorted(TERMINAL_EVENTS):
            try:
                raw = await js.get_last_msg(stream, self.subjects.task_event(task.tenant, task.id, kind))
            except NotFoundError:
                continue
            if raw.data is None:
                raise ValueError(f"{stream}: the {kind} event of task {task.id} has no payload")
            return msgspec.json.decode(raw.data, type=TaskEvent)
        return None

    # -- the report --

    def _report(self, started: float) -> Report:
        ended = {tid: e for tid, e in self.sent.items() if e.event is not None}
        usage = _usage_by_task(self.settings.clickhouse_url, ended)
        e2e: list[float] = []
        overhead: list[float] = []
        backend: list[float] = []
        mismatched: list[str] = []
        for task_id, entry in ended.items():
            task_usage = usage.get(task_id, NO_USAGE)
            if task_usage.rows != entry.ending.calls:
                mismatched.append(task_id)
            if entry.ending.kind != "done":
                continue
            # Recovered from the stream: timed by the mesh's clock (same machine in a load test).
            total_ms = (
                (entry.ended_at - entry.sent_at) * 1000
                if entry.ended_at is not None
                else entry.ending.time_ms - entry.task.submitted_ms
            )
            e2e.append(total_ms)
            backend.append(task_usage.backend_ms)
            overhead.append(total_ms - task_usage.backend_ms)
        calls = sum(u.rows for u in usage.values())
        cache_hits = sum(u.cache_hits for u in usage.values())
        input_tokens = sum(u.input_tokens for u in usage.values())
        finish = max((e.ended_at for e in ended.values() if e.ended_at is not None), default=time.monotonic())
        wall_s = max(finish - started, 1e-9)
        span_s = (self.rows[-1].arrival_s - self.rows[0].arrival_s) / self.options.speed if self.rows else 0.0
        outcomes = {kind: 0 for kind in sorted(ENDINGS)}
        reasons: collections.Counter[str] = collections.Counter()
        for entry in ended.values():
            outcome = "refused" if entry.refused else entry.ending.kind
            outcomes[outcome] += 1
            if outcome != "done":
                reasons[f"{outcome}: {entry.ending.detail}"] += 1
        return Report(
            rows=len(self.rows),
            published=len(self.sent),
            publish_errors=self.live.publish_errors,
            skipped_oversize=self.skipped_oversize,
            outcomes=outcomes,
            not_done_reasons=dict(reasons.most_common(MAX_REASONS)),
            wall_s=wall_s,
            offered_tasks_per_s=len(self.sent) / span_s if span_s > 0 else float(len(self.sent)),
            throughput_tasks_per_s=len(ended) / wall_s,
            e2e_latency_ms=percentiles(e2e),
            mesh_overhead_ms=percentiles(overhead),
            backend_ms=percentiles(backend),
            calls=calls,
            cache_hits=cache_hits,
            cache_hit_share=cache_hits / calls if calls else 0.0,
            cached_input_share=(
                sum(u.cached_input_tokens for u in usage.values()) / input_tokens if input_tokens else 0.0
            ),
            spend_usd=sum(u.usd for u in usage.values()),
            zero_loss=ZeroLoss(
                published=len(self.sent),
                ended=len(ended),
                missing=len(self.sent) - len(ended),
                calls_reported=sum(e.ending.calls for e in ended.values()),
                usage_rows=calls,
                tasks_with_row_mismatch=len(mismatched),
                mismatched_tasks=mismatched[:MISMATCHES_NAMED],
            ),
        )


@dataclass(frozen=True)
class TaskUsage:
    """A task's usage rows in ClickHouse, summed."""

    rows: int
    cache_hits: int
    backend_ms: float  # latency of the inference services' rows
    usd: float
    input_tokens: int  # of the inference services' rows, as is cached_input_tokens
    cached_input_tokens: int


NO_USAGE = TaskUsage(rows=0, cache_hits=0, backend_ms=0.0, usd=0.0, input_tokens=0, cached_input_tokens=0)


def _usage_by_task(clickhouse_url: str, ended: dict[str, _Sent]) -> dict[str, TaskUsage]:
    """Per task, its usage; waits for the accountant to catch up."""
    expected = sum(e.ending.calls for e in ended.values())
    ch = clickhouse_connect.get_client(dsn=clickhouse_url)
    ids = sorted(ended)
    deadline = time.monotonic() + INGEST_WAIT_S
    while True:
        by_task: dict[str, TaskUsage] = {}
        # In slices: the ids travel as one HTTP form field, which the server caps in length.
        for start in range(0, len(ids), IDS_PER_QUERY):
            result = ch.query(
                "SELECT task_id, count(), countIf(outcome = 'cache_hit'), "
                "sumIf(latency_ms, service IN {services:Array(String)}), toFloat64(sum(cost_usd)), "
                "sumIf(input_tokens, service IN {services:Array(String)}), "
                "sumIf(cached_input_tokens, service IN {services:Array(String)}) "
                "FROM usage_events FINAL WHERE task_id IN {ids:Array(String)} GROUP BY task_id",
                parameters={"ids": ids[start : start + IDS_PER_QUERY], "services": list(INFERENCE_SERVICES)},
            ).result_rows
            by_task.update((row[0], TaskUsage(*row[1:])) for row in result)
        if sum(u.rows for u in by_task.values()) >= expected or time.monotonic() > deadline:
            ch.close()
            return by_task
        time.sleep(0.25)


async def replay(
    settings: MeshSettings,
    rows: Sequence[TraceRow],
    options: ReplayOptions,
    on_tick: Callable[[Live], None] | None = None,
) -> Report:
    return await Replayer(settings, rows, options).run(on_tick)
