"""One running instance of an agent: a NATS micro service (ADR-32) with one endpoint, ``mesh.agent.<name>``.

The endpoint is in queue group ``<name>``, so every instance of an agent shares its requests. nats-py
runs a subscription's callback one message at a time, and an agent's request waits seconds on model
calls: the callback only takes a slot (``max_concurrency`` of them) and hands the request to its own
task, which replies itself. A full instance stops taking messages off its subscription until a slot
frees, so it never holds more requests than it may run.

Every request gets an answer. An ``AgentRequest`` the instance cannot read goes whole to
``mesh.dlq.agent-<name>`` with the reason and is answered with a ``Rejection``. A readable one gets
an ``AgentResult``: the handler's artifacts, or the ``ErrorInfo`` of the ``AgentError`` (a
``CallRefused`` among them) that ended it, or kind ``agent`` for any other exception, or ``timeout``
at the step's deadline, where the handler is cancelled; always with what it stored and its calls'
ids and cost. A failing request never stops the instance.

What the instance measured of the requests it finished (``AgentStats``) is its endpoint's stats
data: ``$SRV.STATS`` answers it, and the registry (services/runtime/agents.py) reads it back.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec
from nats.micro import Request
from nats.micro.service import EndpointConfig, EndpointStats, Service, ServiceConfig

from frugalmesh.agents.context import Context
from frugalmesh.agents.errors import AgentError
from schemas.messages import AgentRequest, AgentResult, ArtifactRef, ErrorInfo
from services.runtime.agents import AgentStats
from services.runtime.bus import Bus, encode
from services.runtime.dead_letters import UNREADABLE

if TYPE_CHECKING:
    from frugalmesh.agents.agent import Agent, Handler, HandlerResult

# On shutdown, how long requests in flight may take to finish before they are cancelled.
DRAIN_S = 5.0


class AgentService:
    """Serves one agent's requests on a connected bus, from ``start`` to ``stop``."""

    def __init__(self, agent: Agent, handler: Handler, bus: Bus) -> None:
        self.agent = agent
        self.handler = handler
        self.bus = bus
        self.stats = AgentStats()
        self._slots = asyncio.Semaphore(agent.max_concurrency)
        self._requests: set[asyncio.Task[None]] = set()
        self._service: Service | None = None

    async def start(self) -> None:
        agent = self.agent
        config = ServiceConfig(
            name=agent.name,
            version=agent.version,
            description=agent.description or None,
            metadata=agent.metadata(self.bus.subjects.prefix),
            stats_handler=self._stats,
        )
        self._service = await self.bus.add_service(config)
        await self._service.add_endpoint(
            EndpointConfig(
                name=agent.name,
                subject=self.bus.subjects.agent(agent.name),
                queue_group=agent.name,
                handler=self._take,
            )
        )
        self.bus.log.info("agent_started", agent=agent.name, version=agent.version, id=self._service.id)

    async def stop(self) -> None:
        """Stop taking requests, give those in flight ``DRAIN_S`` to finish, then cancel the rest."""
        if self._service is not None:
            await self._service.stop()
            self._service = None
        if self._requests:
            _, late = await asyncio.wait(set(self._requests), timeout=DRAIN_S)
            for request in late:
                request.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _stats(self, endpoint: EndpointStats) -> dict[str, Any]:
        stats: dict[str, Any] = msgspec.to_builtins(self.stats)
        return stats

    async def _take(self, request: Request) -> None:
        # Waiting here holds the subscription's next message: a full instance takes no more work.
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(request))
        self._requests.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        self._slots.release()

    async def _serve(self, request: Request) -> None:
        try:
            message = msgspec.json.decode(request.data, type=AgentRequest)
        except UNREADABLE as exc:
            reason = f"AgentRequest: {exc}"
            await self.bus.dead_letter(request.subject, request.data, request.headers, reason)
            await self._reply(request, Bus.rejection(reason))
            return
        self.stats.in_flight += 1
        started = time.monotonic()
        try:
            result = await self._run(message)
        finally:
            self.stats.in_flight -= 1
        self.stats.served += 1
        self.stats.busy_s += time.monotonic() - started
        self.stats.cost_usd += result.cost_usd
        if result.error is None and result.artifacts:
            self.stats.succeeded += 1
        await self._reply(request, encode(result))

    async def _run(self, message: AgentRequest) -> AgentResult:
        ctx = Context(message, self.bus, self.agent.name)
        error: ErrorInfo | None = None
        artifacts: list[ArtifactRef] = []
        deadline = asyncio.timeout(ctx.left_s())
        try:
            async with deadline:
                artifacts = _result_refs(await self.handler(ctx), ctx)
        except AgentError as stopped:
            error = stopped.error
            ctx.log.info("agent_stopped", kind=error.kind, reason=error.message)
        except TimeoutError as exc:
            if deadline.expired():
                error = ErrorInfo(kind="timeout", message="the step's deadline passed before the agent finished")
                ctx.log.info("agent_timed_out")
            else:  # a time-out of the handler's own
                error = ErrorInfo(kind="agent", message=repr(exc), retryable=True)
                ctx.log.exception("agent_failed")
        except Exception as exc:
            error = ErrorInfo(kind="agent", message=repr(exc), retryable=True)
            ctx.log.exception("agent_failed")
        if error is not None:
            artifacts = list(ctx.stored)
        return AgentResult(artifacts=artifacts, error=error, cost_usd=ctx.spent_usd, calls=list(ctx.calls))

    async def _reply(self, request: Request, data: bytes) -> None:
        try:
            await request.respond(data)
        except Exception as exc:  # no reply subject, or the connection is closing: nothing to answer to
            self.bus.log.warning("agent_reply_lost", agent=self.agent.name, error=repr(exc))


def _result_refs(returned: HandlerResult, ctx: Context) -> list[ArtifactRef]:
    """The artifacts a handler's return value names; None: every one it stored, in order."""
    if returned is None:
        return list(ctx.stored)
    if isinstance(returned, ArtifactRef):
        return [returned]
    if isinstance(returned, list) and all(isinstance(ref, ArtifactRef) for ref in returned):
        return list(returned)
    raise TypeError(f"a handler returns an ArtifactRef, a list of them or None, not {type(returned).__name__}")
