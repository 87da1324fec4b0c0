"""The planner's request/reply clients: the router (one model call), agent services (one agent step)
and the artifact store.

Each turns what goes wrong on the wire into ``StepFailed``, with the kind a task's outcome is
decided on. A router nobody answers is ``unavailable`` and retryable (it may be restarting); one
that answers after the deadline is ``timeout``; a router's refusal keeps the router's kind and
retryability. An agent nobody answers is ``unavailable``, one that does not answer in time is
``timeout``: both retryable (another instance may take the next try); one that cannot read the
request rejects it, which reads as an AgentResult with an ``invalid`` error. An artifact store that
is unavailable (nobody answers, not in time, or its rejection says retryable: it could not reach
JetStream, as while a cluster elects a new leader) is asked again, with backoff, for up to
``STORE_WAIT_S`` in all: the artifact may hold a model's answer already paid for, and a failed step
would throw it away. One that refuses the request for good, or answers something else, fails the
step at once.

The artifact client works for one tenant at a time: the tenant of the task being run, which
``Planner.run`` binds with ``artifacts_of`` around the whole run (every asyncio task a step starts
inherits it). Every put is stored as that tenant's and every get asks as that tenant, so no step,
prompt or agent-step code passes a tenant it could get wrong, and a ref to another tenant's
artifact (an agent's answer, say) reads as missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from decimal import Decimal

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas.messages import (
    AgentRequest,
    AgentResult,
    Artifact,
    ArtifactGet,
    ArtifactRef,
    ArtifactReply,
    InferenceResult,
    StepRequest,
)
from schemas.subjects import HEADER_BUDGET, HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT
from services.planner.state import StepFailed, TaskState
from services.runtime.bus import Bus, Rejected, now_ms


class RouterClient:
    """Sends a step's ``StepRequest`` to the router, within the task's deadline and budget cap."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def call(self, state: TaskState, request: StepRequest) -> InferenceResult:
        """One call for ``state``'s task. A result carrying an error is returned (the caller may retry);
        no reply, or a rejection instead of a result, raises StepFailed.

        The call is counted in ``state.calls`` when sent, and uncounted when no router took it or the
        router refused it: only a call that may have been metered counts."""
        timeout_s = state.left_s()
        if timeout_s <= 0:
            raise StepFailed("deadline exceeded before the call", kind="timeout")
        headers = task_headers(state, state.deadline_ms)
        # Counted when sent: a call the deadline cancels in flight is still metered by the services.
        state.calls += 1
        try:
            return await self.bus.request(
                self.bus.subjects.step_request, request, InferenceResult, timeout_s, headers=headers
            )
        except NoRespondersError:
            state.calls -= 1  # no router got it: nothing was metered
            raise StepFailed("no router is answering step requests", kind="unavailable", retryable=True) from None
        except NatsTimeoutError:
            raise StepFailed("the router did not answer before the deadline", kind="timeout") from None
        except Rejected as rejected:
            # The router refused the step before any inference call, so nothing was metered.
            state.calls -= 1
            error = rejected.error
            raise StepFailed(
                f"router refused the step: {error.kind}: {error.message}", error.kind, error.retryable
            ) from None
        except msgspec.DecodeError as exc:
            state.calls -= 1  # whatever answered, it was no inference the router metered
            raise StepFailed(f"the router's reply is neither a result nor an error: {exc}", kind="invalid") from None


class AgentClient:
    """Sends an agent step's ``AgentRequest`` to ``mesh.agent.<name>`` and waits until its deadline."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def call(self, state: TaskState, request: AgentRequest) -> AgentResult:
        """The agent's result; StepFailed when no instance answers in time or the agent rejects the request."""
        name = request.agent
        timeout_s = (request.deadline_ms - now_ms()) / 1000
        if timeout_s <= 0:
            raise StepFailed(f"deadline exceeded before agent {name!r} was asked", kind="timeout")
        headers = task_headers(state, request.deadline_ms)
        try:
            subject = self.bus.subjects.agent(name)
            return await self.bus.request(subject, request, AgentResult, timeout_s, headers=headers)
        except NoRespondersError:
            raise StepFailed(f"no instance of agent {name!r} is answering", "unavailable", retryable=True) from None
        except NatsTimeoutError:
            raise StepFailed(
                f"agent {name!r} did not answer within {timeout_s:.1f} s", kind="timeout", retryable=True
            ) from None
        except msgspec.DecodeError as exc:
            # A Rejection reads as an AgentResult with an error (the same fields): only garbage lands here.
            raise StepFailed(f"agent {name!r} answered no AgentResult: {exc}", "invalid") from None


def task_headers(state: TaskState, deadline_ms: int) -> dict[str, str]:
    """The headers every request of a task's step carries: its deadline, task, tenant and budget cap."""
    task = state.task
    headers = {HEADER_DEADLINE: str(deadline_ms), HEADER_TASK: task.id, HEADER_TENANT: task.tenant}
    if task.budget_usd is not None:
        # The router reserves against the task's cap; a decimal string, never "1e-05".
        headers[HEADER_BUDGET] = format(Decimal(repr(task.budget_usd)), "f")
    return headers


# The tenant of the task the running asyncio task works for (see ``artifacts_of``).
_task_tenant: ContextVar[str] = ContextVar("task_tenant")


@contextmanager
def artifacts_of(tenant: str) -> Iterator[None]:
    """Inside this block, and in every asyncio task started in it, ``ArtifactClient`` puts and gets
    artifacts as ``tenant``'s."""
    bound = _task_tenant.set(tenant)
    try:
        yield
    finally:
        _task_tenant.reset(bound)


def _tenant() -> str:
    try:
        return _task_tenant.get()
    except LookupError:
        raise RuntimeError("ArtifactClient used outside artifacts_of(tenant): whose artifacts are these?") from None


# How long an unavailable artifact store is waited for (a JetStream cluster's leader election takes
# seconds), and the pauses between tries: doubling from the first to the longest.
STORE_WAIT_S = 20.0
STORE_PAUSE_S = (0.25, 2.0)


class ArtifactClient:
    """Stores and reads artifacts in the artifact store (content-addressed: a rerun stores nothing twice),
    as the tenant ``artifacts_of`` binds."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def put(self, artifact: Artifact) -> ArtifactRef:
        """Store ``artifact`` as the task's tenant's and return its reference; StepFailed when the store refuses it."""
        owned = msgspec.structs.replace(artifact, tenant=_tenant())
        reply = await self._request(self.bus.subjects.artifact_put(owned.tenant), owned)
        if reply.ref is None:
            raise StepFailed(
                f"the artifact store refused the {artifact.type!r} artifact: {reply.error}", kind="invalid"
            )
        return reply.ref

    async def get(self, artifact_id: str) -> Artifact:
        """The task's tenant's artifact with that id; StepFailed (``unavailable``) when it cannot be read."""
        tenant = _tenant()
        reply = await self._request(self.bus.subjects.artifact_get(tenant), ArtifactGet(id=artifact_id, tenant=tenant))
        if reply.artifact is None:
            raise StepFailed(f"artifact {artifact_id} could not be read: {reply.error}", kind="unavailable")
        return reply.artifact

    async def _request(self, subject: str, message: msgspec.Struct) -> ArtifactReply:
        """The store's reply, asked again while the store is unavailable, for up to ``STORE_WAIT_S`` in all
        (a step's wait also ends at the task's deadline, which cancels the step)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + STORE_WAIT_S
        pause, longest = STORE_PAUSE_S
        while True:
            timeout_s = max(min(self.timeout_s, give_up_at - loop.time()), pause)
            try:
                return await self.bus.request(subject, message, ArtifactReply, timeout_s)
            except (NoRespondersError, NatsTimeoutError):
                problem = "the artifact store is not answering"
            except Rejected as rejected:
                problem = f"the artifact store refused the request: {rejected}"
                if not rejected.error.retryable:
                    raise StepFailed(problem, kind="invalid") from None
            except msgspec.DecodeError as exc:
                raise StepFailed(f"the artifact store's reply is not an ArtifactReply: {exc}", kind="invalid") from None
            if loop.time() + pause > give_up_at:
                raise StepFailed(problem, kind="unavailable")
            self.bus.log.warning("artifact_store_unavailable", problem=problem, retry_in_s=pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, longest)
