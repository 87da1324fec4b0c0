"""Layer 2 for gateway tasks: the same call, and all calls, of one task are bounded on every replica.

Requests that carry ``X-Frugalmesh-Task`` form one task (services/runtime/task_limits.py has the
limits and why they are these): the same call (the model asked for, the messages, the options,
``max_tokens`` and the response schema) at most ``identical_calls`` times, and at most
``max_calls_per_task`` calls in all. Requests without the header are each their own task: nothing
here runs for them, so they pay nothing for it. An admitted request counts whatever becomes of it
(answered, served from the cache, refused by a cap, failed): a loop on errors is still a loop.

State that survives any number of stateless replicas: one key per task in the KV bucket
``<prefix>_gateway_tasks`` (``<tenant>.<task id>``: one tenant cannot use up another's task by
guessing its id), holding the task's call count and a count per distinct call (the first 16 hex
digits of the call's sha256). A count only moves by compare-and-set on the key's revision, so two
replicas admitting the last allowed call cannot both win; the loser reads again and is refused.
The bucket's TTL expires a key ``task_ttl_s`` after its last counted call.

Cost on the hot path: each replica remembers the revision and counts it wrote last for recent tasks,
so the next call of a task on the same replica is one compare-and-set round trip; a call after
another replica's is two (the failed write, then a read and a write). A refusal is only ever
decided on counts just read, never on remembered ones, which a TTL expiry may have reset.

A refused call never reaches a router: nothing is reserved, spent or sent, so it has no usage row
(the mesh meters one row per call attempt the router takes, as for the planner's own layer-2
refusals); it is an HTTP 429 whose message names layer 2 and the limit, and whose ``code`` is the
limit's name. Counts that cannot be read or written (NATS unreachable) fail closed: a 503 that may
be retried, never an uncounted call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.messages import StepRequest
from schemas.subjects import BUCKET_GATEWAY_TASKS
from services.gateway.errors import GatewayError
from services.gateway.translate import H_TASK
from services.runtime.bus import Bus
from services.runtime.task_limits import TaskLimits

# Tasks whose last written revision a replica remembers (a few hundred bytes each, at most).
RECENT_TASKS = 4096
CALL_DIGITS = 16  # of the sha256: 64 bits, no collision among a task's few thousand calls


class TaskCalls(msgspec.Struct, frozen=True):
    """One task's counts, as stored: ``calls`` in all, and per distinct call (by its hash)."""

    calls: int = 0
    same: dict[str, int] = msgspec.field(default_factory=dict)

    def counted(self, call: str) -> TaskCalls:
        return TaskCalls(self.calls + 1, {**self.same, call: self.same.get(call, 0) + 1})


_decode = msgspec.json.Decoder(TaskCalls).decode


def call_hash(model: str, step: StepRequest) -> str:
    """What makes two requests the same call: the model asked for, messages, options, limits, schema."""
    canonical = msgspec.json.encode(
        [model, step.messages, step.options, step.max_tokens, step.response_schema], order="sorted"
    )
    return hashlib.sha256(canonical).hexdigest()[:CALL_DIGITS]


def loop_refused(message: str, limit: str) -> GatewayError:
    # Not retryable: the same task asking again is the loop this stops.
    return GatewayError(429, message, type="rate_limit_exceeded", code=limit)


class TaskCallCounter:
    """Admits (and counts) or refuses each call of a gateway task; ``open`` it once connected."""

    def __init__(self, kv: KeyValue, limits: TaskLimits) -> None:
        self.kv = kv
        self.limits = limits
        # task key -> (revision, counts) this replica wrote last; least recently used first.
        self._recent: OrderedDict[str, tuple[int, TaskCalls]] = OrderedDict()

    @classmethod
    async def open(cls, bus: Bus, limits: TaskLimits) -> TaskCallCounter:
        """The counter over ``bus``'s bucket, created with the limits' TTL when missing (an existing
        bucket keeps the TTL it was made with)."""
        bucket = bus.subjects.bucket(BUCKET_GATEWAY_TASKS)
        return cls(await bus.key_value(bucket, history=1, ttl_s=limits.gateway.task_ttl_s), limits)

    async def admit(self, step: StepRequest, model: str, headers: Mapping[str, str]) -> None:
        """Count the call of ``step`` (``model``: as the client asked) in its task; GatewayError (429)
        when layer 2 refuses it, (503) when the counts cannot be reached. No-op without a task header."""
        if not headers.get(H_TASK):
            return
        key = f"{step.tenant}.{step.task_id}"
        call = call_hash(model, step)
        known = self._recent.pop(key, None)
        try:
            while True:
                fresh = known is None
                if known is None:
                    known = await self._read(key)
                revision, counts = known
                refusal = self._refusal(counts, call, step.task_id, model)
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
            message = f"layer 2 (anti-loop): the task's call counts are unreachable ({exc!r}); the call was not sent"
            raise GatewayError(503, message, type="api_error", code="task_limits_unavailable", retryable=True) from None

    async def _read(self, key: str) -> tuple[int, TaskCalls]:
        """The task's revision and counts; revision 0 when it has none (new, or expired)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return 0, TaskCalls()
        return entry.revision or 0, _decode(entry.value) if entry.value else TaskCalls()

    def _refusal(self, counts: TaskCalls, call: str, task_id: str, model: str) -> GatewayError | None:
        most = self.limits.gateway.max_calls_per_task
        if counts.calls >= most:
            return loop_refused(
                f"layer 2 (anti-loop): task {task_id!r} already made {counts.calls} calls; the limit is {most} "
                "calls per task (max_calls_per_task, deploy/planner.toml [gateway])",
                "max_calls_per_task",
            )
        same, identical = counts.same.get(call, 0), self.limits.identical_calls
        if same >= identical:
            return loop_refused(
                f"layer 2 (anti-loop): the same call (model {model!r}, same messages and options) was already "
                f"sent {same} times in task {task_id!r}; the limit is {identical} (identical_calls, "
                "deploy/planner.toml [limits])",
                "identical_calls",
            )
        return None

    def _remember(self, key: str, revision: int, counts: TaskCalls) -> None:
        self._recent[key] = (revision, counts)
        if len(self._recent) > RECENT_TASKS:
            self._recent.popitem(last=False)
