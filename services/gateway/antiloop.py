"""Layer 2 for gateway tasks: the same call, and all calls, of one task are bounded on every replica.

Requests that carry ``X-Frugalmesh-Task`` form one task, counted by the mesh's one per-task counter
(services/runtime/task_calls.py, keys ``gateway.<tenant>.<task id>``): the same call (the model
asked for, the messages, the options, ``max_tokens`` and the response schema) at most
``identical_calls`` times, and at most ``[gateway] max_calls_per_task`` calls in all. Requests
without the header are each their own task: nothing here runs for them, so they pay nothing for it.

A refused call never reaches a router: nothing is reserved, spent or sent, so it has no usage row
(the mesh meters one row per call attempt the router takes, as for the planner's own layer-2
refusals); it is an HTTP 429 whose message names layer 2 and the limit, and whose ``code`` is the
limit's name. Counts that cannot be read or written (NATS unreachable) fail closed: a 503 that may
be retried, never an uncounted call.
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.messages import StepRequest
from services.gateway.errors import GatewayError
from services.gateway.translate import H_TASK
from services.runtime.bus import Bus
from services.runtime.task_calls import TaskCallCounter, TaskCallRefused, TaskCallsUnreachable
from services.runtime.task_limits import TaskLimits


class GatewayTasks:
    """Admits (and counts) or refuses each request of a gateway task; ``open`` it once connected."""

    def __init__(self, counter: TaskCallCounter) -> None:
        self.counter = counter

    @classmethod
    async def open(cls, bus: Bus, limits: TaskLimits) -> GatewayTasks:
        return cls(await TaskCallCounter.open(bus, limits, "gateway"))

    async def admit(self, step: StepRequest, model: str, headers: Mapping[str, str]) -> None:
        """Count the call of ``step`` (``model``: as the client asked) in its task; GatewayError (429)
        when layer 2 refuses it, (503) when the counts cannot be reached. No-op without a task header."""
        if not headers.get(H_TASK):
            return
        try:
            await self.counter.admit(step, model)
        except TaskCallRefused as refused:
            # Not retryable: the same task asking again is the loop this stops.
            raise GatewayError(429, str(refused), type="rate_limit_exceeded", code=refused.limit) from None
        except TaskCallsUnreachable as unreachable:
            raise GatewayError(
                503, str(unreachable), type="api_error", code="task_limits_unavailable", retryable=True
            ) from None
