"""Layer 2 (anti-loop) for the agent services' own calls, enforced at the router: an agent may be written
in any language, so the bound on its calls cannot live in its code, only where every call passes.

A step with ``agent`` set is counted in its task (the mesh's one per-task counter,
services/runtime/task_calls.py, keys ``agent.<tenant>.<task id>``: apart from a gateway task of the
same id) before anything else happens to it: before the cache lookup, spillover, the kill switch
and the reservation, so a loop served from the cache is stopped too. The same call (role, messages,
options, ``max_tokens``, response schema; whatever model runs it) at most ``[limits] identical_calls``
times in one task, and at most ``[agents] max_calls_per_task`` calls of all the task's agents
together (deploy/planner.toml). A step is counted once, on its first model call, whatever number of
calls its policy makes: a cascade's escalation answers the same step, it is not a repeat.

A refused step is an error result of kind ``refused``, not retryable (the same task asking again is
the loop this stops), whose message names layer 2 and the limit; it is metered like the router's other
refusals (services/router/metering.py): one usage row, outcome ``refused``, at $0, on the model the
policy chose, with the agent's name. Counts that cannot be read or written fail closed: an
``unavailable`` error that may be retried, metered the same way; the call is never sent uncounted.

Steps without an agent (the planner's own, bounded by their workflow, and the gateway's, counted by
the gateway) pay nothing for this.
"""

from __future__ import annotations

from schemas.messages import ErrorInfo, InferenceResult, StepRequest
from services.router.metering import CallMeter, ModelCall
from services.routing.policies import Call
from services.runtime.catalog import ModelSpec
from services.runtime.task_calls import TaskCallCounter, TaskCallRefused, TaskCallsUnreachable


class AgentCallLimits:
    def __init__(self, counter: TaskCallCounter, meter: CallMeter) -> None:
        self.counter = counter
        self.meter = meter

    def counted(self, step: StepRequest, call: Call) -> Call:
        """``call`` (a policy's model call for an agent's ``step``), counted on its first use, which
        answers the refusal instead of calling when layer 2 refuses the step."""
        counted = False

        async def first_counted(model: ModelSpec) -> InferenceResult:
            nonlocal counted
            if not counted:
                counted = True
                refusal = await self._refusal(step, model)
                if refusal is not None:
                    return refusal
            return await call(model)

        return first_counted

    async def _refusal(self, step: StepRequest, model: ModelSpec) -> InferenceResult | None:
        """None when the step is admitted (and counted); else its metered error result."""
        try:
            await self.counter.admit(step, step.role)
        except TaskCallRefused as refused:
            error = ErrorInfo(kind="refused", message=str(refused))
        except TaskCallsUnreachable as unreachable:
            error = ErrorInfo(kind="unavailable", message=str(unreachable), retryable=True)
        else:
            return None
        return await self.meter.not_started(ModelCall(step, model), error)
