"""What an agent's handler works with for one request: the step, its model calls and its artifacts.

A ``Context`` is made per ``AgentRequest``. Its model calls (``llm``) are ``StepRequest``s to the
router as calls of the request's task: the task id, tenant, workflow, deadline and allow-list go in
the message, the task headers and the task's budget cap (``Mesh-Budget``) go in the headers, exactly
as the planner sends its own steps, and ``agent`` names this agent. So the router reserves each call
against the task's cap, applies the kill switch, pinning and the deadline, layer 2 counts the agent's
calls per task, and the usage row carries the agent's name: an agent cannot spend outside the task.

Whatever stops a call arrives as ``CallRefused`` with the mesh's ``ErrorInfo``, so the agent decides
what to do (return its best artifact so far) rather than parse errors. The context keeps the account
the ``AgentResult`` reports (every call id and cost, including calls that failed: they may have been
metered) and hands the calls made since the last ``put`` to the next artifact as its lineage.

Artifacts are the request's tenant's: ``put`` stores them as that tenant's and ``get`` asks as that
tenant, so a ref to another tenant's artifact reads as missing (the store refuses it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import msgspec
import structlog
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from frugalmesh.agents.errors import CallRefused
from schemas.messages import (
    AgentRequest,
    Artifact,
    ArtifactGet,
    ArtifactRef,
    ArtifactReply,
    ChatMessage,
    ErrorInfo,
    ErrorKind,
    InferenceResult,
    StepRequest,
)
from schemas.subjects import HEADER_BUDGET, HEADER_DEADLINE, HEADER_TASK, HEADER_TENANT
from services.runtime.bus import Bus, Rejected, now_ms


def _refusal(kind: ErrorKind, message: str, retryable: bool = False) -> CallRefused:
    return CallRefused(ErrorInfo(kind=kind, message=message, retryable=retryable))


class Context:
    """One request to an agent: read the step (``goal``, ``inputs``, ``needs``, ``params``), call models
    (``llm``), read and store artifacts (``get``, ``put``)."""

    def __init__(self, request: AgentRequest, bus: Bus, agent: str) -> None:
        self.request = request
        self.agent = agent
        self._bus = bus
        # The account of this request: every call sent and what it cost.
        self.calls: list[str] = []
        self.spent_usd = 0.0
        # Every artifact stored, in order: the result when the handler names none.
        self.stored: list[ArtifactRef] = []
        # The calls since the last put: the lineage (and cost) of the next artifact.
        self._unstored_calls: list[str] = []
        self._unstored_usd = 0.0
        self._attempt = 0
        self.log: structlog.stdlib.BoundLogger = bus.log.bind(
            task_id=request.task_id, step_id=request.step_id, agent=agent
        )

    # -- the step, as the planner handed it over --

    @property
    def task_id(self) -> str:
        return self.request.task_id

    @property
    def step_id(self) -> str:
        return self.request.step_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def goal(self) -> str:
        return self.request.goal

    @property
    def inputs(self) -> list[ArtifactRef]:
        return self.request.inputs

    @property
    def needs(self) -> dict[str, ArtifactRef]:
        return self.request.needs

    @property
    def params(self) -> dict[str, Any]:
        return self.request.params

    @property
    def artifact(self) -> str:
        """The artifact type the step must produce."""
        return self.request.artifact

    @property
    def deadline_ms(self) -> int:
        return self.request.deadline_ms

    @property
    def allow_models(self) -> list[str] | None:
        return self.request.allow_models

    @property
    def budget_left(self) -> float | None:
        """What the task may still spend, in USD, less what this request spent; None: no task cap."""
        left = self.request.budget_left_usd
        return None if left is None else left - self.spent_usd

    def left_s(self) -> float:
        """Seconds until the step's deadline (negative once it passed)."""
        return (self.request.deadline_ms - now_ms()) / 1000

    # -- model calls --

    async def llm(
        self,
        messages: Sequence[Mapping[str, Any] | ChatMessage],
        *,
        max_tokens: int = 512,
        role: str = "agent",
        response_schema: dict[str, Any] | None = None,
    ) -> InferenceResult:
        """One model call through the router, as a call of this task; waits until the deadline at most.

        Raises ``CallRefused`` when the call did not succeed: the router refused it, the model failed,
        the deadline passed or no router answers."""
        timeout_s = self.left_s()
        if timeout_s <= 0:
            raise _refusal("timeout", "the step's deadline passed before the call")
        self._attempt += 1
        request = StepRequest(
            task_id=self.task_id,
            step_id=self.step_id,
            tenant=self.tenant,
            workflow=self.request.workflow,
            role=role,
            messages=[m if isinstance(m, ChatMessage) else msgspec.convert(dict(m), ChatMessage) for m in messages],
            max_tokens=max_tokens,
            response_schema=response_schema,
            allow_models=self.allow_models,
            deadline_ms=self.deadline_ms,
            attempt=self._attempt,
            agent=self.agent,
        )
        result = await self._send(request, timeout_s)
        self.calls.append(result.call_id)
        self._unstored_calls.append(result.call_id)
        self.spent_usd += result.cost_usd
        self._unstored_usd += result.cost_usd
        if result.error is not None:
            raise CallRefused(result.error)
        return result

    async def _send(self, request: StepRequest, timeout_s: float) -> InferenceResult:
        headers = {HEADER_DEADLINE: str(self.deadline_ms), HEADER_TASK: self.task_id, HEADER_TENANT: self.tenant}
        budget = self.request.task_budget_usd
        if budget is not None:
            # The router reserves against the task's cap; a decimal string, never "1e-05".
            headers[HEADER_BUDGET] = format(Decimal(repr(budget)), "f")
        bus = self._bus
        try:
            return await bus.request(bus.subjects.step_request, request, InferenceResult, timeout_s, headers=headers)
        except NoRespondersError:
            raise _refusal("unavailable", "no router is answering step requests", retryable=True) from None
        except NatsTimeoutError:
            raise _refusal("timeout", "the router did not answer before the step's deadline") from None
        except Rejected as rejected:
            raise CallRefused(rejected.error) from None
        except msgspec.DecodeError as exc:
            raise _refusal("invalid", f"the router's reply is neither a result nor an error: {exc}") from None

    # -- artifacts --

    async def get(self, ref: ArtifactRef | str) -> Artifact:
        """The artifact ``ref`` points at (a reference or an id), body included; LookupError when
        unreadable, or when it is not the request's tenant's."""
        artifact_id = ref if isinstance(ref, str) else ref.id
        request = ArtifactGet(id=artifact_id, tenant=self.tenant)
        reply = await self._store_request(self._bus.subjects.artifact_get(self.tenant), request)
        if reply.artifact is None:
            raise LookupError(f"artifact {artifact_id} could not be read: {reply.error}")
        return reply.artifact

    async def put(
        self, artifact_type: str, body: dict[str, Any], parents: list[ArtifactRef | str] | None = None
    ) -> ArtifactRef:
        """Store an artifact of this step, as the request's tenant's, made by the calls since the last put
        (their ids and cost); ValueError when the store refuses the body."""
        artifact = Artifact(
            type=artifact_type,
            tenant=self.tenant,
            task_id=self.task_id,
            step_id=self.step_id,
            calls=list(self._unstored_calls),
            parents=[p if isinstance(p, str) else p.id for p in parents or []],
            body=body,
            cost_usd=self._unstored_usd,
            created_ms=now_ms(),
        )
        reply = await self._store_request(self._bus.subjects.artifact_put(self.tenant), artifact)
        if reply.ref is None:
            raise ValueError(f"the artifact store refused the {artifact_type!r} artifact: {reply.error}")
        self.stored.append(reply.ref)
        self._unstored_calls.clear()
        self._unstored_usd = 0.0
        return reply.ref

    async def _store_request(self, subject: str, message: msgspec.Struct) -> ArtifactReply:
        bus = self._bus
        try:
            return await bus.request(subject, message, ArtifactReply, bus.settings.request_timeout_s)
        except (NoRespondersError, NatsTimeoutError):
            raise ConnectionError("the artifact store is not answering") from None
