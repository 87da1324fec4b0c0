"""Every message that crosses the bus, as msgspec Structs (JSON on the wire).

Each top-level message carries ``v`` (the schema version) so a consumer can refuse or adapt
to a version it does not know. Unknown fields are ignored, so adding an optional field is a
compatible change; renaming or removing one is not and bumps ``SCHEMA_VERSION``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1

Tier = Literal["local", "mid", "frontier"]
Role = Literal["system", "user", "assistant"]


class Message(msgspec.Struct, kw_only=True):
    """Base of every top-level wire message."""

    v: int = SCHEMA_VERSION


class ArtifactRef(msgspec.Struct, kw_only=True):
    """A pointer to an artifact in the artifact store; steps pass these, never bodies."""

    id: str
    type: str


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str


class Task(Message, kw_only=True):
    """A unit of work submitted to the mesh (``mesh.task.submit``)."""

    id: str
    tenant: str = "default"
    workflow: str = "answer"
    goal: str = ""
    inputs: list[ArtifactRef] = []
    budget_usd: float | None = None
    deadline_s: float | None = None
    quality_target: float | None = None
    # Pinning: when set, no call of this task may run on a model outside this list.
    allow_models: list[str] | None = None
    idempotency_key: str | None = None
    submitted_ms: int = 0
    # Overrides every model step's max_tokens (a load replay asks for the recorded output length).
    max_tokens: int | None = None


TaskEventKind = Literal[
    "accepted",
    "planned",
    "step_started",
    "step_done",
    "escalated",
    "refused",
    "partial",
    "done",
    "failed",
    "killed",
]
TERMINAL_EVENTS: frozenset[str] = frozenset({"partial", "done", "failed", "killed"})


class TaskEvent(Message, kw_only=True):
    """A step in a task's life (``mesh.task.event.<task_id>``)."""

    task_id: str
    kind: TaskEventKind
    time_ms: int
    tenant: str = "default"
    workflow: str = ""
    step_id: str | None = None
    detail: str = ""
    # The step's output on step_done; the final answer on done/partial.
    artifact: ArtifactRef | None = None
    # Running totals for the task at the time of the event.
    cost_usd: float = 0.0
    calls: int = 0


class StepRequest(Message, kw_only=True):
    """The planner asks the router to run one model step (``mesh.step.request``)."""

    task_id: str
    step_id: str
    tenant: str = "default"
    workflow: str = ""
    role: str
    messages: list[ChatMessage]
    max_tokens: int = 512
    response_schema: dict[str, Any] | None = None
    allow_models: list[str] | None = None
    deadline_ms: int
    attempt: int = 1


class InferenceRequest(Message, kw_only=True):
    """One model call (``mesh.infer.local.<model>`` / ``mesh.infer.cloud.<provider>``)."""

    call_id: str
    task_id: str
    step_id: str
    tenant: str = "default"
    attempt: int = 1
    model: str
    tier: Tier
    messages: list[ChatMessage]
    max_tokens: int = 512
    temperature: float = 0.0
    response_schema: dict[str, Any] | None = None
    deadline_ms: int
    reservation_id: str | None = None
    # Set by the router when the local tier's queue would break the deadline: the local model
    # this call was meant for, so the usage row says the call spilled over.
    spilled_from: str = ""


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0


ErrorKind = Literal["invalid", "timeout", "killed", "refused", "provider", "unavailable", "pinning"]


class ErrorInfo(msgspec.Struct, kw_only=True):
    kind: ErrorKind
    message: str
    retryable: bool = False


class Rejection(Message, kw_only=True):
    """The reply to a request the service could not accept (undecodable, invalid, refused before
    any work): every request/reply subject of the mesh answers this instead of its reply type, so
    a requester gets the reason at once rather than a time-out."""

    error: ErrorInfo


class InferenceResult(Message, kw_only=True):
    """The answer to an InferenceRequest (also the router's reply to a StepRequest)."""

    call_id: str
    model: str
    provider_model: str = ""
    tier: Tier
    provider: str = ""
    output: str = ""
    finish_reason: str = ""
    usage: Usage = msgspec.field(default_factory=Usage)
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    cache_hit: bool = False
    error: ErrorInfo | None = None
    # Replay backends only: whether the recorded answer was graded correct.
    graded: bool | None = None
    # Time from the service taking the call to the engine's first output token (0: not streamed).
    ttft_ms: float = 0.0
    spilled_from: str = ""


Outcome = Literal["ok", "error", "timeout", "killed", "cache_hit", "refused"]
UsageSource = Literal["provider", "estimated"]


class UsageEvent(Message, kw_only=True):
    """Exactly one per call, whatever its outcome (``mesh.usage.<tenant>``)."""

    event_id: str
    time_ms: int
    tenant: str
    task_id: str
    step_id: str = ""
    call_id: str = ""
    service: str
    tier: Tier
    provider: str
    model: str
    requested_model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    outcome: Outcome
    usage_source: UsageSource = "provider"
    # The hardware profile (deploy/hardware.toml) that priced a local call; "" for list prices.
    hardware_profile: str = ""
    # The local model a spilled call was meant for (InferenceRequest.spilled_from).
    spilled_from: str = ""


class Reservation(Message, kw_only=True):
    """Reserve a call's worst-case cost, or settle it (``mesh.budget.reserve|settle``)."""

    id: str
    tenant: str
    task_id: str
    model: str
    amount_usd: float
    expires_ms: int
    # The task's own cap (Task.budget_usd), which only the caller knows.
    task_budget_usd: float | None = None
    # Set on settle: what the call really cost.
    actual_usd: float | None = None


class ReservationDecision(Message, kw_only=True):
    id: str
    granted: bool
    reason: str = ""


KillScope = Literal["global", "tenant", "task", "model"]


class KillSwitch(Message, kw_only=True):
    """Trip or clear the kill switch for a scope (``mesh.control.kill``)."""

    scope: KillScope
    key: str = "*"
    tripped: bool
    reason: str = ""
    by: str = ""
    time_ms: int


PaceAction = Literal["normal", "downgrade", "throttle"]


class PaceSignal(Message, kw_only=True):
    """Month-to-date spend against the month's budget curve (``mesh.control.pace``)."""

    tenant: str
    action: PaceAction
    spend_usd: float
    curve_usd: float
    time_ms: int


class LocalLoad(Message, kw_only=True):
    """What a local model's engine is doing now, as one local-inference replica sees it
    (``mesh.local.load.<model>``, core NATS, about every 250 ms; the router keeps the latest).

    ``engine`` names whose /metrics the numbers come from (``llamacpp``: llama.cpp's server or the
    embedded engine; ``vllm``); "" when the engine has none (a replay model) or could not be read,
    and then only ``in_flight`` is known.
    """

    model: str
    # The local-inference process that measured it: replicas report separately.
    replica: str
    engine: str = ""
    # The /metrics URL read: replicas reporting the same endpoint report the same engine.
    endpoint: str = ""
    running: int = 0
    waiting: int = 0
    # Share of the engine's KV cache in use, 0 to 1.
    kv_cache_usage: float = 0.0
    # Recent decoding speed of one sequence, output tokens per second; None when not measured yet.
    decode_tokens_per_s: float | None = None
    # Calls this replica has sent to the model and not yet had answered.
    in_flight: int = 0
    time_ms: int


BudgetScope = Literal["global", "tenant", "model"]
BudgetWindow = Literal["day", "month"]


class BudgetCap(msgspec.Struct, kw_only=True):
    """The caps of one scope in USD; None means no cap for that window."""

    scope: BudgetScope
    key: str = "*"
    day_usd: float | None = None
    month_usd: float | None = None


class BudgetUpdate(Message, kw_only=True):
    """Change a scope's caps at run time (``mesh.budget.set``); the accountant replies BudgetState.

    A window given here replaces the current cap, a window named in ``unset`` loses its cap,
    and a window in neither keeps what it had.
    """

    scope: BudgetScope
    key: str = "*"
    day_usd: float | None = None
    month_usd: float | None = None
    unset: list[BudgetWindow] = []
    by: str = ""


class BudgetQuery(Message, kw_only=True):
    """Ask for caps and current spend (``mesh.budget.show``); None matches every scope or key."""

    scope: Literal["global", "tenant", "model", "task"] | None = None
    key: str | None = None


class BudgetSpend(msgspec.Struct, kw_only=True):
    """Spend of one scope in one period: ``window`` day (period 2025-11-20), month (2025-11) or task."""

    scope: Literal["global", "tenant", "model", "task"]
    key: str
    window: Literal["day", "month", "task"]
    period: str
    settled_usd: float
    reserved_usd: float
    cap_usd: float | None = None


class BudgetState(Message, kw_only=True):
    """The accountant's reply to BudgetQuery and BudgetUpdate; ``error`` set when refused."""

    caps: list[BudgetCap] = []
    spend: list[BudgetSpend] = []
    outstanding: int = 0
    time_ms: int = 0
    error: str | None = None


class Artifact(Message, kw_only=True):
    """A typed, content-addressed output. ``id`` is the sha256 of the canonical body."""

    id: str = ""
    type: str
    schema_version: int = 1
    task_id: str = ""
    step_id: str = ""
    calls: list[str] = []
    parents: list[str] = []
    body: dict[str, Any]
    cost_usd: float = 0.0
    created_ms: int = 0


class ArtifactGet(Message, kw_only=True):
    id: str


class ArtifactReply(Message, kw_only=True):
    """Reply to put (``ref`` set) and get (``artifact`` set); ``error`` when refused."""

    ref: ArtifactRef | None = None
    artifact: Artifact | None = None
    error: str | None = None


class DeadLetter(Message, kw_only=True):
    """A message a service could not accept, kept whole with the reason (``mesh.dlq.<service>``)."""

    service: str
    subject: str
    error: str
    data: bytes
    headers: dict[str, str] = {}
    time_ms: int


# Every message a non-Python agent may need a JSON Schema for, by name.
WIRE_MESSAGES: tuple[type[Message], ...] = (
    Rejection,
    Task,
    TaskEvent,
    StepRequest,
    InferenceRequest,
    InferenceResult,
    UsageEvent,
    Reservation,
    ReservationDecision,
    KillSwitch,
    PaceSignal,
    LocalLoad,
    BudgetUpdate,
    BudgetQuery,
    BudgetState,
    Artifact,
    ArtifactGet,
    ArtifactReply,
    DeadLetter,
)
