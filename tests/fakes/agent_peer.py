"""A test peer standing in for an agent service (plain nats-py and its ``nats.micro``, real NATS), for
planner tests: registered as any agent is (an ADR-32 micro service named after the agent, with the
mesh's metadata and one endpoint on ``mesh.agent.<name>`` in queue group ``<name>``), so the planner's
pre-flight finds it, and answering with whatever the test decides.

``respond`` gets the decoded AgentRequest and returns an AgentResult, raw bytes, or None (never
answer). It may store artifacts first with ``put`` (the real artifact store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
from nats.micro import ServiceConfig, add_service
from nats.micro.request import Request

from schemas.messages import AgentRequest, AgentResult, Artifact, ArtifactRef, ArtifactReply
from schemas.subjects import (
    AGENT_META_CONSUMES,
    AGENT_META_COST_USD,
    AGENT_META_LATENCY_S,
    AGENT_META_PREFIX,
    AGENT_META_PRODUCES,
    AGENT_META_SUCCESS,
)

AgentResponder = Callable[["AgentTestPeer", AgentRequest], Awaitable[AgentResult | bytes | None]]


class AgentTestPeer:
    """One instance of agent ``name`` on ``settings``'s mesh; records the requests and headers it got."""

    def __init__(self, nc, settings, name: str, respond: AgentResponder, figures: tuple | None = None) -> None:
        self.nc = nc
        self.subjects = settings.subjects
        self.prefix = settings.subject_prefix
        self.name = name
        self.respond = respond
        self.figures = figures
        self.requests: list[AgentRequest] = []
        self.headers: list[dict[str, str]] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> AgentTestPeer:
        metadata = {AGENT_META_PREFIX: self.prefix, AGENT_META_CONSUMES: "text", AGENT_META_PRODUCES: "answer"}
        if self.figures is not None:
            cost, latency, success = self.figures
            metadata |= {AGENT_META_COST_USD: str(cost), AGENT_META_LATENCY_S: str(latency)}
            metadata[AGENT_META_SUCCESS] = str(success)
        self.service = await add_service(self.nc, ServiceConfig(name=self.name, version="0.0.1", metadata=metadata))
        await self.service.add_endpoint(
            name="step", subject=self.subjects.agent(self.name), queue_group=self.name, handler=self._on_request
        )
        await self.nc.flush()
        return self

    async def _on_request(self, request: Request) -> None:
        task = asyncio.create_task(self._answer(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: Request) -> None:
        agent_request = msgspec.json.decode(request.data, type=AgentRequest)
        self.requests.append(agent_request)
        self.headers.append(dict(request.headers or {}))
        reply = await self.respond(self, agent_request)
        if reply is not None:
            await request.respond(reply if isinstance(reply, bytes) else msgspec.json.encode(reply))

    async def put(self, request: AgentRequest, artifact_type: str, body: dict, **fields) -> ArtifactRef:
        """Store an artifact of the request's tenant, task and step; the stored ref."""
        artifact = Artifact(
            type=artifact_type,
            tenant=request.tenant,
            task_id=request.task_id,
            step_id=request.step_id,
            body=body,
            **fields,
        )
        reply = await self.nc.request(
            self.subjects.artifact_put(artifact.tenant), msgspec.json.encode(artifact), timeout=5
        )
        stored = msgspec.json.decode(reply.data, type=ArtifactReply)
        assert stored.ref is not None, stored.error
        return stored.ref

    async def stop(self) -> None:
        await self.service.stop()
        for task in self._tasks:
            task.cancel()
