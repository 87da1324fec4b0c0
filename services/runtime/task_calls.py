"""Layer 2 (anti-loop) per-task call counts, the same on every replica: the one counter of the
gateway's tasks (services/gateway/antiloop.py) and of the agents' calls at the router
(services/router/agent_calls.py). services/runtime/task_limits.py has the limits and why they are these.

A counted call is admitted, and counted, or refused: the same call at most ``identical_calls``
times in its task, and at most ``max_calls_per_task`` calls in all. What makes two calls the same
is what the caller asked for besides the messages (``call_hash``: the model a gateway client named;
an agent's step role, whatever model the router picks), the messages, the options, ``max_tokens``
and the response schema. An admitted call counts whatever becomes of it (answered, served from the
cache, refused by a cap, failed): a loop on errors is still a loop.

State that survives any number of stateless replicas: one key per task in the KV bucket
``<prefix>_task_calls``, ``<kind>.<tenant>.<task id>`` with kind ``gateway`` or ``agent``, holding the
task's call count and a count per distinct call (the first 16 hex digits of the call's sha256). The
tenant keeps one tenant from using up another's task by guessing its id; the kind keeps a gateway
task and a planner task of the same id (whose agents' calls are counted) apart, each bound by its own
table. A count only moves by compare-and-set on the key's revision, so two replicas admitting the
last allowed call cannot both win; the loser reads again and is refused. The bucket's TTL
(``[gateway] task_ttl_s``, for both kinds) expires a key that long after its last counted call.

Cost on the hot path: each counter remembers the revision and counts it wrote last for recent tasks,
so the next call of a task on the same replica is one compare-and-set round trip; a call after
another replica's is two (the failed write, then a read and a write). A refusal is only ever
decided on counts just read, never on remembered ones, which a TTL expiry may have reset.

A refusal is ``TaskCallRefused`` (not to be retried: the same task asking again is the loop this
stops), counts that cannot be read or written (NATS unreachable) ``TaskCallsUnreachable`` (may be
retried): each caller answers them its own way, and never sends an uncounted call.

A stored value that is not a task's counts (not ``TaskCalls``, or a count out of the schema's
``Count`` bounds: a negative one would give a loop more calls) is dead-lettered and counts nothing:
the call replaces it with its own first count, by compare-and-set on its revision. Refusing instead
would protect nothing (a writer that can garble the counts can delete them) and would stop the task
until the key expires.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Literal

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.messages import Count, StepRequest
from schemas.subjects import BUCKET_TASK_CALLS, token
from services.runtime.bus import Bus
from services.runtime.dead_letters import UNREADABLE, entry_subject
from services.runtime.task_limits import TaskLimits

# Whose calls a counter counts: a gateway task's, or the agent services' within a (planner) task.
TaskKind = Literal["gateway", "agent"]
# The planner.toml table holding each kind's max_calls_per_task.
LIMITS_TABLE: dict[TaskKind, str] = {"gateway": "gateway", "agent": "agents"}
# Tasks whose last written revision a counter remembers (a few hundred bytes each, at most).
RECENT_TASKS = 4096
CALL_DIGITS = 16  # of the sha256: 64 bits, no collision among a task's few thousand calls


class TaskCallRefused(Exception):
    """Layer 2 refuses the call; ``limit`` is the limit's name (identical_calls or max_calls_per_task)."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class TaskCallsUnreachable(Exception):
    """The task's counts cannot be read or written: the call must not go out uncounted."""


class TaskCalls(msgspec.Struct, frozen=True):
    """One task's counts, as stored: ``calls`` in all, and per distinct call (by its hash)."""

    calls: Count = 0
    same: dict[str, Count] = msgspec.field(default_factory=dict)

    def counted(self, call: str) -> TaskCalls:
        return TaskCalls(self.calls + 1, {**self.same, call: self.same.get(call, 0) + 1})


_decode = msgspec.json.Decoder(TaskCalls).decode


def call_hash(asked: str, step: StepRequest) -> str:
    """What makes two calls of a task the same call: ``asked`` (the model a gateway client named, or an
    agent step's role), the messages, options, ``max_tokens`` and response schema."""
    canonical = msgspec.json.encode(
        [asked, step.messages, step.options, step.max_tokens, step.response_schema], order="sorted"
    )
    return hashlib.sha256(canonical).hexdigest()[:CALL_DIGITS]


class TaskCallCounter:
    """Admits (and counts) or refuses each call of one kind of task; ``open`` it once connected."""

    def __init__(self, bus: Bus, kv: KeyValue, limits: TaskLimits, kind: TaskKind) -> None:
        self.bus = bus
        self.kv = kv
        self.kind = kind
        self.identical_calls = limits.identical_calls
        self.max_calls_per_task = (limits.gateway if kind == "gateway" else limits.agents).max_calls_per_task
        # task key -> (revision, counts) this counter wrote last; least recently used first.
        self._recent: OrderedDict[str, tuple[int, TaskCalls]] = OrderedDict()

    @classmethod
    async def open(cls, bus: Bus, limits: TaskLimits, kind: TaskKind) -> TaskCallCounter:
        """The counter over ``bus``'s bucket, created with the limits' TTL when missing (an existing
        bucket keeps the TTL it was made with)."""
        bucket = bus.subjects.bucket(BUCKET_TASK_CALLS)
        return cls(bus, await bus.key_value(bucket, history=1, ttl_s=limits.gateway.task_ttl_s), limits, kind)

    async def admit(self, step: StepRequest, asked: str) -> None:
        """Count the call of ``step`` in its task (``asked``: as ``call_hash`` takes it). TaskCallRefused
        when layer 2 refuses it, TaskCallsUnreachable when the counts cannot be reached; ValueError
        when the tenant or task id cannot be part of a key."""
        key = f"{self.kind}.{token(step.tenant)}.{token(step.task_id)}"
        call = call_hash(asked, step)
        known = self._recent.pop(key, None)
        try:
            while True:
                fresh = known is None
                if known is None:
                    known = await self._read(key)
                revision, counts = known
                refusal = self._refusal(counts, call, step.task_id, asked)
                if refusal is not None:
                    if fresh:
                        raise refusal
                    known = None  # remembered counts may be stale (expired): decide on read ones
                    continue
                counted = counts.counted(call)
                try:
                    if revision == 0:
                        revision = await self.kv.create(key, msgspec.json.encode(counted))
                    else:
                        revision = await self.kv.update(key, msgspec.json.encode(counted), last=revision)
                except KeyWrongLastSequenceError:
                    known = None  # another call of the task was counted first: read again
                    continue
                self._remember(key, revision, counted)
                return
        except (nats.errors.Error, TimeoutError) as exc:
            raise TaskCallsUnreachable(
                f"layer 2 (anti-loop): the task's call counts are unreachable ({exc!r}); the call was not sent"
            ) from None

    async def _read(self, key: str) -> tuple[int, TaskCalls]:
        """The task's revision and counts; revision 0 when it has none (new, or expired). Counts that
        cannot be read are dead-lettered and read as none, under their revision, so the next write
        replaces them."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return 0, TaskCalls()
        try:
            return entry.revision or 0, _decode(entry.value or b"")
        except UNREADABLE as exc:
            error = f"task call counts {key}: {exc}"
            await self.bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)
            return entry.revision or 0, TaskCalls()

    def _refusal(self, counts: TaskCalls, call: str, task_id: str, asked: str) -> TaskCallRefused | None:
        most, table = self.max_calls_per_task, LIMITS_TABLE[self.kind]
        if counts.calls >= most:
            whose = f"task {task_id!r}" if self.kind == "gateway" else f"the agents of task {task_id!r}"
            return TaskCallRefused(
                f"layer 2 (anti-loop): {whose} already made {counts.calls} calls; the limit is {most} "
                f"calls per task (max_calls_per_task, deploy/planner.toml [{table}])",
                "max_calls_per_task",
            )
        same, identical = counts.same.get(call, 0), self.identical_calls
        if same >= identical:
            what = "model" if self.kind == "gateway" else "role"
            return TaskCallRefused(
                f"layer 2 (anti-loop): the same call ({what} {asked!r}, same messages and options) was already "
                f"sent {same} times in task {task_id!r}; the limit is {identical} (identical_calls, "
                "deploy/planner.toml [limits])",
                "identical_calls",
            )
        return None

    def _remember(self, key: str, revision: int, counts: TaskCalls) -> None:
        self._recent[key] = (revision, counts)
        if len(self._recent) > RECENT_TASKS:
            self._recent.popitem(last=False)
