"""The agent registry, read from NATS's own service framework (ADR-32) rather than a home-made one.

Every agent instance is a NATS micro service named after its agent (``frugalmesh.agents`` registers
one; a Node.js agent uses ``nc.services.add``), with one endpoint on ``mesh.agent.<name>`` in queue
group ``<name>``. Its metadata says which mesh it serves, the artifact types it consumes and
produces, and optionally its declared figures (schemas/subjects.py ``AGENT_META_*``); its endpoint
stats may carry ``AgentStats``, what the instance measured of its own requests.

Two questions are asked of it:

- ``live_agent``: is any instance of this agent up, and what are its figures? One request to
  ``$SRV.STATS.<name>``: NATS answers "no responders" at once when nobody serves the name, so the
  pre-flight refuses a task that needs a dead agent without waiting for a time-out;
- ``agent_instances``: every live instance with its stats (``frugalmesh agents``): a request many
  answer, gathered for a short window.
"""

from __future__ import annotations

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas.subjects import (
    AGENT_META_CONSUMES,
    AGENT_META_COST_USD,
    AGENT_META_LATENCY_S,
    AGENT_META_PREFIX,
    AGENT_META_PRODUCES,
    AGENT_META_SUCCESS,
    SRV_STATS,
    service_subject,
)
from services.runtime.bus import Bus

# How long a listing waits for instances to describe themselves (they answer in about a millisecond).
GATHER_WINDOW_S = 0.3
# How long a liveness check waits for the one instance that answers first.
LIVE_TIMEOUT_S = 1.0


class AgentStats(msgspec.Struct, kw_only=True):
    """What an instance measured of the requests it finished (its endpoint's stats ``data``)."""

    served: int = 0
    succeeded: int = 0
    in_flight: int = 0
    cost_usd: float = 0.0
    busy_s: float = 0.0


class EndpointStats(msgspec.Struct, kw_only=True):
    """One endpoint of a ``$SRV.STATS`` reply (the fields frugalmesh reads)."""

    name: str
    subject: str
    queue_group: str = ""
    num_requests: int = 0
    num_errors: int = 0
    average_processing_time: int = 0
    data: AgentStats | None = None


class ServiceStats(msgspec.Struct, kw_only=True):
    """A ``$SRV.STATS`` reply (ADR-32)."""

    name: str
    id: str
    version: str = ""
    metadata: dict[str, str] | None = None
    endpoints: list[EndpointStats] | None = None
    started: str = ""


class AgentInstance(msgspec.Struct, kw_only=True):
    """One live instance of an agent, as its stats reply describes it."""

    name: str
    id: str
    version: str
    subject: str
    consumes: list[str]
    produces: list[str]
    # Declared in its metadata (None: not declared).
    cost_usd: float | None
    latency_s: float | None
    success_rate: float | None
    stats: AgentStats
    started: str = ""

    def figures(self) -> tuple[float, float, float] | None:
        """(cost USD, latency s, success share) of one request: declared where declared, else measured
        from what the instance served; None when neither says."""
        measured = self.stats.served > 0
        served = max(self.stats.served, 1)
        cost = _either(self.cost_usd, self.stats.cost_usd / served, measured)
        latency = _either(self.latency_s, self.stats.busy_s / served, measured)
        success = _either(self.success_rate, self.stats.succeeded / served, measured)
        if cost is None or latency is None or success is None:
            return None
        return cost, latency, success


def _either(declared: float | None, measured: float, has_measured: bool) -> float | None:
    return declared if declared is not None else measured if has_measured else None


def _floats(metadata: dict[str, str], key: str) -> float | None:
    try:
        return float(metadata[key])
    except (KeyError, ValueError):
        return None


def _names(metadata: dict[str, str], key: str) -> list[str]:
    return [name.strip() for name in metadata.get(key, "").split(",") if name.strip()]


def agent_metadata(
    prefix: str,
    consumes: list[str],
    produces: list[str],
    *,
    cost_usd: float | None = None,
    latency_s: float | None = None,
    success_rate: float | None = None,
) -> dict[str, str]:
    """An agent instance's micro-service metadata, as ``parse_instance`` reads it back: the mesh it
    serves, its artifact types, its declared figures (those given)."""
    metadata = {
        AGENT_META_PREFIX: prefix,
        AGENT_META_CONSUMES: ",".join(consumes),
        AGENT_META_PRODUCES: ",".join(produces),
    }
    declared = ((AGENT_META_COST_USD, cost_usd), (AGENT_META_LATENCY_S, latency_s), (AGENT_META_SUCCESS, success_rate))
    metadata.update({key: repr(float(value)) for key, value in declared if value is not None})
    return metadata


def parse_instance(data: bytes, prefix: str) -> AgentInstance | None:
    """The agent instance a ``$SRV.STATS`` reply describes; None when it is not an agent of this mesh
    (another mesh's, or another kind of micro service) or the reply is unreadable."""
    try:
        reply = msgspec.json.decode(data, type=ServiceStats)
    except msgspec.DecodeError:
        return None
    metadata = reply.metadata or {}
    if metadata.get(AGENT_META_PREFIX) != prefix:
        return None
    endpoints = reply.endpoints or []
    endpoint = next((e for e in endpoints if e.subject.startswith(f"{prefix}.agent.")), None)
    if endpoint is None:
        return None
    return AgentInstance(
        name=reply.name,
        id=reply.id,
        version=reply.version,
        subject=endpoint.subject,
        consumes=_names(metadata, AGENT_META_CONSUMES),
        produces=_names(metadata, AGENT_META_PRODUCES),
        cost_usd=_floats(metadata, AGENT_META_COST_USD),
        latency_s=_floats(metadata, AGENT_META_LATENCY_S),
        success_rate=_floats(metadata, AGENT_META_SUCCESS),
        # An agent that reports no stats of its own: NATS's count of requests, and of error replies.
        stats=endpoint.data
        or AgentStats(served=endpoint.num_requests, succeeded=endpoint.num_requests - endpoint.num_errors),
        started=reply.started,
    )


async def live_agent(bus: Bus, name: str, timeout_s: float = LIVE_TIMEOUT_S) -> AgentInstance | None:
    """An instance of agent ``name`` serving this mesh, or None when there is none (at once when nobody
    serves the name at all)."""
    subject = service_subject(SRV_STATS, name)
    try:
        first = await bus.request_bytes(subject, timeout_s)
    except (NoRespondersError, NatsTimeoutError):
        return None
    instance = parse_instance(first, bus.subjects.prefix)
    if instance is not None:
        return instance
    # The first to answer serves another mesh on this account: look at every instance of the name.
    return next(iter(await agent_instances(bus, name)), None)


async def agent_instances(bus: Bus, name: str = "", window_s: float = GATHER_WINDOW_S) -> list[AgentInstance]:
    """Every live instance of this mesh's agents (of agent ``name`` only, when given), by name then id."""
    replies = await bus.gather(service_subject(SRV_STATS, name), window_s)
    instances = [i for i in (parse_instance(r, bus.subjects.prefix) for r in replies) if i is not None]
    return sorted(instances, key=lambda i: (i.name, i.id))
