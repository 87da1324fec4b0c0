"""An agent service, declared: ``Agent(name, ...)`` plus one async handler, run as its own FastStream app.

The declaration is what the mesh knows of an agent before it runs anything: its name (the last token
of ``mesh.agent.<name>`` and its NATS micro-service name, so it must be a subject token), its version
(semantic, as ADR-32 wants), the artifact types it consumes and produces, and optionally the cost,
latency and success share of one request as its authors measured them (the pre-flight prices a plan
with them until the instance has measured its own). ``app(settings)`` builds one instance; running
several, on any machines, scales the agent: they share one queue group.

Everything is checked here, so a bad declaration fails where it is written, not at start-up.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence

from faststream import FastStream
from nats.micro.service import ServiceConfig

from frugalmesh.agents.context import Context
from frugalmesh.agents.service import AgentService
from schemas.messages import ArtifactRef
from schemas.subjects import token
from services.runtime.agents import agent_metadata
from services.runtime.bus import Bus
from services.runtime.settings import MeshSettings

# What a handler returns: the artifacts that are the step's result (best last), or None for every one it stored.
HandlerResult = ArtifactRef | list[ArtifactRef] | None
Handler = Callable[[Context], Awaitable[HandlerResult]]

# Requests one instance works on at once: each is a coroutine waiting on model calls, not a worker.
DEFAULT_MAX_CONCURRENCY = 16


class Agent:
    """An agent service: ``@agent.handler`` marks the async function that answers one request."""

    def __init__(
        self,
        name: str,
        *,
        version: str = "0.1.0",
        consumes: Sequence[str] = (),
        produces: Sequence[str] = (),
        description: str = "",
        cost_usd: float | None = None,
        latency_s: float | None = None,
        success_rate: float | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        try:
            token(name)
        except ValueError:
            raise ValueError(
                f"agent name {name!r} must be one NATS subject token (it is the last token of <prefix>.agent.<name> "
                "and the micro service's name): use only letters, digits, '-' and '_'"
            ) from None
        try:
            ServiceConfig(name=name, version=version)  # nats.micro's own check of the version
        except ValueError:
            raise ValueError(f"agent {name!r}: version {version!r} is not a semantic version (e.g. 1.0.0)") from None
        for artifact_type in (*consumes, *produces):
            # Artifact types are subject tokens (mesh.artifact.created.<type>), so never hold the list's comma.
            token(artifact_type)
        for figure, value in (("cost_usd", cost_usd), ("latency_s", latency_s)):
            if value is not None and value < 0:
                raise ValueError(f"agent {name!r}: {figure} must not be negative, got {value}")
        if success_rate is not None and not 0 <= success_rate <= 1:
            raise ValueError(f"agent {name!r}: success_rate is a share from 0 to 1, got {success_rate}")
        if max_concurrency < 1:
            raise ValueError(f"agent {name!r}: max_concurrency must be at least 1, got {max_concurrency}")
        self.name = name
        self.version = version
        self.consumes = list(consumes)
        self.produces = list(produces)
        self.description = description
        self.cost_usd = cost_usd
        self.latency_s = latency_s
        self.success_rate = success_rate
        self.max_concurrency = max_concurrency
        self._handler: Handler | None = None

    def handler(self, function: Handler) -> Handler:
        """Decorator: ``function(ctx)`` answers each request (one handler per agent)."""
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"agent {self.name!r}: the handler must be an async function (async def)")
        if self._handler is not None:
            raise ValueError(f"agent {self.name!r} already has a handler: {self._handler.__name__}")
        self._handler = function
        return function

    def metadata(self, prefix: str) -> dict[str, str]:
        """The micro service's metadata: the mesh it serves, its artifact types, its declared figures."""
        return agent_metadata(
            prefix,
            self.consumes,
            self.produces,
            cost_usd=self.cost_usd,
            latency_s=self.latency_s,
            success_rate=self.success_rate,
        )

    def app(self, settings: MeshSettings) -> FastStream:
        """One instance of the agent on the mesh ``settings`` name: ``await app.run()``, or start and stop it."""
        if self._handler is None:
            raise ValueError(
                f"agent {self.name!r} has no handler: decorate an async function taking a Context with @<agent>.handler"
            )
        bus = Bus(settings, f"agent-{self.name}")
        app = bus.app()
        service = AgentService(self, self._handler, bus)
        # Registered after bus.app()'s own hook, so the connection is up; the app's after-startup
        # flush then makes sure the server knows the endpoint before anyone is told it runs.
        app.on_startup(service.start)
        app.on_shutdown(service.stop)
        return app
