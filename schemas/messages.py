"""Every message that crosses the bus, as msgspec Structs (JSON on the wire).

Each top-level message carries ``v`` (the schema version) so a consumer can refuse or adapt
to a version it does not know. Unknown fields are ignored, so adding an optional field is a
compatible change; renaming or removing one is not and bumps ``SCHEMA_VERSION``.

Field meanings live in ``Meta(description=...)``, so the exported JSON Schemas (``schemas/json``)
tell an agent in another language what a field is, its unit and who sets it. Times are ms since
the Unix epoch (UTC), money is USD, and token counts are the model's own tokenizer's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION = 1

# Bounds on every field (issue 16, item 6). A message past one is refused when it is decoded, with
# msgspec's error naming the field and the bound (e.g. "Expected `str` of length <= 256 - at
# `$.tenant`"), before any service code runs: it goes to the dead-letter subject and a requester
# gets a Rejection. The bounds are far above real traffic; they exist so that no value is unbounded.
MAX_ID = 256  # ids and names (tenants, tasks, steps, calls, models, agents, keys): subject tokens, KV keys
# Free text (a prompt message, a goal, an output, an error): 4 MiB, four times NATS's default max_payload,
# so a ~1 MB prompt always fits and only a server configured for larger messages meets the bound.
MAX_TEXT = 4 * 1024 * 1024
MAX_ITEMS = 10_000  # entries of a list or map: a prompt's messages, a task's inputs, a history, a body's keys
MAX_TIME_MS = 10_000_000_000_000  # times, ms since the epoch: year 2286 (inside ClickHouse's DateTime64(3))
MAX_COUNT = 2**53  # counts (tokens, calls, attempts): the largest integer every JSON reader holds exactly
MAX_TOKENS = 10_000_000  # one call's output-token cap
MAX_USD = 1e9  # money, USD: a call's cost, a hold, a cap
MAX_QUANTITY = 1e12  # durations (ms) and rates: 31 years in ms
MAX_DEADLINE_S = 365 * 24 * 3600  # a task's deadline: a year

Id = Annotated[str, Meta(max_length=MAX_ID)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Ids = Annotated[list[Id], Meta(max_length=MAX_ITEMS)]
JsonObject = Annotated[dict[Text, Any], Meta(max_length=MAX_ITEMS)]  # keys bounded; depth by the decoder's stack
TimeMs = Annotated[int, Meta(ge=0, le=MAX_TIME_MS)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
Usd = Annotated[float, Meta(ge=0, le=MAX_USD)]  # also refuses infinity (JSON's 1e999)
Quantity = Annotated[float, Meta(ge=0, le=MAX_QUANTITY)]
Share = Annotated[float, Meta(ge=0, le=1)]

Tier = Literal["local", "mid", "frontier"]
Role = Literal["system", "developer", "user", "assistant", "tool"]


class WireMessage(msgspec.Struct, kw_only=True):
    """Base of every top-level wire message."""

    v: Annotated[
        Count,
        Meta(
            description="Schema version of this message (SCHEMA_VERSION), set by the sender; "
            "a receiver may refuse a version it does not know."
        ),
    ] = SCHEMA_VERSION


class ArtifactRef(msgspec.Struct, kw_only=True):
    """A pointer to an artifact in the artifact store; steps pass these, never bodies."""

    id: Annotated[
        Id,
        Meta(description="The artifact's content address (64 lowercase hex digits), computed by the artifact store."),
    ]
    type: Annotated[
        Id,
        Meta(description="The artifact type (schemas/artifacts.py ARTIFACT_TYPES, e.g. answer), which fixes the body."),
    ]


class FunctionCall(msgspec.Struct, kw_only=True):
    """The function a model asked to call, as in the OpenAI chat API."""

    name: Annotated[Id, Meta(description="The function's name, one of the call's tools.")]
    arguments: Annotated[Text, Meta(description="Its arguments as the model wrote them: JSON text, not checked.")]


class ToolCall(msgspec.Struct, kw_only=True):
    """One tool call of an assistant message (OpenAI's ``tool_calls`` items)."""

    id: Annotated[Id, Meta(description="The call's id; the tool message that answers it names it.")]
    type: Annotated[Literal["function"], Meta(description="Always function.")] = "function"
    function: Annotated[FunctionCall, Meta(description="The function and its arguments.")]


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message of a chat prompt, as in the OpenAI chat API."""

    role: Annotated[
        Role,
        Meta(
            description="Who speaks: system or developer (instructions), user (the prompt), assistant (an "
            "earlier reply) or tool (a tool's result)."
        ),
    ]
    content: Annotated[Text, Meta(description="The message text; empty for an assistant message of tool calls.")] = ""
    tool_calls: Annotated[
        Annotated[list[ToolCall], Meta(max_length=MAX_ITEMS)] | None,
        Meta(description="An assistant message's tool calls; null: none."),
    ] = None
    tool_call_id: Annotated[Id | None, Meta(description="A tool message's answer to this tool call (ToolCall.id).")] = (
        None
    )
    name: Annotated[Id | None, Meta(description="An optional name of the speaker.")] = None


class FunctionSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A function a model may call (OpenAI's ``tools[].function``)."""

    name: Annotated[Id, Meta(description="The function's name.")]
    description: Annotated[Text | None, Meta(description="What it does, for the model.")] = None
    parameters: Annotated[JsonObject | None, Meta(description="Its arguments as a JSON Schema object; null: none.")] = (
        None
    )
    strict: Annotated[
        bool | None, Meta(description="Whether the provider must make the arguments follow the schema exactly.")
    ] = None


class Tool(msgspec.Struct, kw_only=True):
    """One tool offered to the model (OpenAI's ``tools`` items)."""

    type: Annotated[Literal["function"], Meta(description="Always function.")] = "function"
    function: Annotated[FunctionSpec, Meta(description="The function.")]


class ChatOptions(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """What an OpenAI-style caller may set beyond messages and max_tokens (the gateway's requests carry
    them; a workflow step leaves them at their defaults). Part of the exact-match cache key."""

    temperature: Annotated[
        Annotated[float, Meta(ge=0, le=2)] | None,
        Meta(
            description="Sampling temperature; null: 0, the mesh's default (repeatable answers, which the cache "
            "assumes)."
        ),
    ] = None
    top_p: Annotated[Share | None, Meta(description="Nucleus sampling mass; null: the engine's default.")] = None
    seed: Annotated[int | None, Meta(description="Sampling seed, where the engine honours one.")] = None
    stop: Annotated[
        Annotated[list[Text], Meta(max_length=MAX_ITEMS)] | None,
        Meta(description="Sequences that end the output (not included in it)."),
    ] = None
    tools: Annotated[
        Annotated[list[Tool], Meta(max_length=MAX_ITEMS)] | None,
        Meta(description="Tools the model may call; null: none."),
    ] = None
    tool_choice: Annotated[
        Id | JsonObject | None,
        Meta(description="none, auto, required, or {type: function, function: {name}}: as in the OpenAI API."),
    ] = None
    json_object: Annotated[
        bool, Meta(description="Whether the output must be a JSON object (OpenAI's response_format json_object).")
    ] = False
    user: Annotated[Id, Meta(description="The caller's end-user id, passed to providers that take one.")] = ""


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A piece of a streamed tool call: the first piece of each call has its id and name, the rest add
    to its arguments (OpenAI's ``delta.tool_calls`` items)."""

    index: Annotated[Count, Meta(description="Which tool call of the output it belongs to, from 0.")]
    id: Annotated[Id | None, Meta(description="The tool call's id, on its first piece.")] = None
    name: Annotated[Id | None, Meta(description="The function's name, on its first piece.")] = None
    arguments: Annotated[Text, Meta(description="More of the arguments' JSON text.")] = ""


class Task(WireMessage, kw_only=True):
    """A unit of work submitted to the mesh (``mesh.task.submit``). Every field is the submitter's."""

    id: Annotated[
        Id,
        Meta(
            description="The task's id, unique per task of its tenant and one subject token (letters, digits, "
            "'-', '_'); also the submission's de-duplication key (Nats-Msg-Id <tenant>.<id>) unless "
            "idempotency_key is set."
        ),
    ]
    tenant: Annotated[Id, Meta(description="The tenant that owns and pays for the task (a subject token).")] = "default"
    workflow: Annotated[
        Id, Meta(description="The workflow to run: a file name in deploy/workflows/ without .toml.")
    ] = "answer"
    goal: Annotated[
        Text, Meta(description="What the task is for, in words; the workflow's prompt templates use it as {goal}.")
    ] = ""
    inputs: Annotated[
        Annotated[list[ArtifactRef], Meta(max_length=MAX_ITEMS)],
        Meta(
            description="The task's inputs, already in the artifact store, in order "
            "(a for_each step runs once per distinct input)."
        ),
    ] = []
    budget_usd: Annotated[
        Usd | None,
        Meta(
            description="The most the whole task may spend, in USD; null: no task cap (tenant, model and global caps "
            "still bind). The planner refuses a plan estimated above it; each paid call reserves against it."
        ),
    ] = None
    deadline_s: Annotated[
        Annotated[float, Meta(gt=0, le=MAX_DEADLINE_S)] | None,
        Meta(
            description="How long the task may run, in seconds from submitted_ms; null: the planner's default "
            "timeout. Past it, work in flight is cancelled and recorded as a timeout."
        ),
    ] = None
    quality_target: Annotated[
        Share | None, Meta(description="The answer quality asked for; reserved: no service reads it yet.")
    ] = None
    allow_models: Annotated[
        Ids | None,
        Meta(
            description="Pinning: the only models (deploy/models.toml names) any call of this task may run on; "
            "null: any model. A step's own list may narrow it, never widen it."
        ),
    ] = None
    idempotency_key: Annotated[
        Id | None,
        Meta(
            description="The submission's de-duplication key (sent as Nats-Msg-Id <tenant>.<key>, so two tenants' "
            "keys never collide): a resubmission of the tenant with the same key inside the stream's duplicate "
            "window is dropped. null: the id is the key."
        ),
    ] = None
    submitted_ms: Annotated[
        TimeMs,
        Meta(
            description="When the task was submitted, ms since the Unix epoch; the deadline counts from it. "
            "0: from when the planner starts it."
        ),
    ] = 0
    max_tokens: Annotated[
        MaxTokens | None,
        Meta(
            description="Output-token cap for every model step, replacing each step's own; null: the steps' own. "
            "A load replay sets it to the recorded output length."
        ),
    ] = None
    live_progress: Annotated[
        bool,
        Meta(
            description="Whether the planner publishes the task's progress events live while it runs; false: only "
            "the terminal event, whose history holds every progress event (for a submitter that waits only for "
            "the outcome: four bus messages fewer per single-step task)."
        ),
    ] = True

    def dedupe_id(self) -> str:
        """The submission's Nats-Msg-Id, ``<tenant>.<idempotency key or id>``: with the tenant in it, two
        tenants' submissions never collide, so neither is dropped as the other's duplicate."""
        return f"{self.tenant}.{self.idempotency_key or self.id}"


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


class TaskEvent(WireMessage, kw_only=True):
    """A step in a task's life (``mesh.task.event.<tenant>.<task_id>.<kind>``), published by the planner
    running the task. Progress events are core NATS, seen live by whoever follows the task; the one
    terminal event is stored (JetStream) and carries every earlier event of the run in ``history``."""

    task_id: Annotated[Id, Meta(description="The task (Task.id).")]
    kind: Annotated[
        TaskEventKind,
        Meta(
            description="What happened: accepted (a planner took the task), planned (the plan is made), "
            "step_started, step_done, escalated (a step moved up a tier), refused (a defence stopped the task: "
            "budget, deadline, anti-loop, pre-flight), then exactly one terminal event: done, partial "
            "(stopped with a result so far), failed (stopped without one) or killed (by the kill switch)."
        ),
    ]
    time_ms: Annotated[TimeMs, Meta(description="When the planner emitted the event, ms since the Unix epoch.")]
    tenant: Annotated[Id, Meta(description="The task's tenant (Task.tenant).")] = "default"
    workflow: Annotated[Id, Meta(description="The task's workflow (Task.workflow).")] = ""
    step_id: Annotated[
        Id | None,
        Meta(
            description="The step the event is about (a workflow step id; <step>[<i>] for item i of a for_each "
            "step); null for an event about the whole task."
        ),
    ] = None
    detail: Annotated[
        Text,
        Meta(
            description="In words: the planned step ids (comma-separated) on planned, the reason on refused, "
            "escalated, partial, failed and killed; often empty."
        ),
    ] = ""
    artifact: Annotated[
        ArtifactRef | None,
        Meta(
            description="The step's output on step_done; the final answer on done; the best artifact so far on "
            "partial, failed or killed (null when there is none)."
        ),
    ] = None
    cost_usd: Annotated[
        Usd, Meta(description="What the task's model calls have cost so far, in USD (a running total).")
    ] = 0.0
    calls: Annotated[
        Count, Meta(description="Model calls the task has sent so far, retries included (a running total).")
    ] = 0
    agent: Annotated[
        Id,
        Meta(
            description="The agent service that runs the step (an agent step's AgentRequest.agent); on a terminal "
            "event, the agent of the workflow's final step (the one that makes the answer); empty: none."
        ),
    ] = ""
    history: Annotated[
        Annotated[list[TaskEvent], Meta(max_length=MAX_ITEMS)],
        Meta(
            description="On the terminal event only: every earlier event of this run of the task, in order "
            "(the audit trail JetStream keeps); empty on progress events."
        ),
    ] = []


class StepRequest(WireMessage, kw_only=True):
    """The planner asks the router to run one model step (``mesh.step.request``). Every field is the planner's."""

    task_id: Annotated[Id, Meta(description="The task the step belongs to (Task.id).")]
    step_id: Annotated[
        Id, Meta(description="The step's id in the task (a workflow step id; <step>[<i>] for item i of a for_each).")
    ]
    tenant: Annotated[Id, Meta(description="The task's tenant: its caps, pace and kill switch bind the call.")] = (
        "default"
    )
    workflow: Annotated[Id, Meta(description="The task's workflow; routing rules may match on it.")] = ""
    role: Annotated[
        Id, Meta(description="The step's role in its workflow (e.g. answer, review); routing rules may match on it.")
    ]
    messages: Annotated[
        Annotated[list[ChatMessage], Meta(max_length=MAX_ITEMS)],
        Meta(description="The prompt, rendered from the step's templates."),
    ]
    max_tokens: Annotated[
        MaxTokens,
        Meta(description="The most output tokens the call may generate; its worst-case cost is reserved for it."),
    ] = 512
    response_schema: Annotated[
        JsonObject | None,
        Meta(
            description="The JSON Schema the reply must follow (structured output: the model-written artifact "
            "type's fields); null: free text."
        ),
    ] = None
    allow_models: Annotated[
        Ids | None,
        Meta(
            description="The models the router may pick from (the task's allow-list narrowed by the step's); "
            "null: any. The router never leaves it."
        ),
    ] = None
    deadline_ms: Annotated[
        TimeMs, Meta(description="The task's deadline, ms since the Unix epoch: the call is cancelled then.")
    ]
    attempt: Annotated[
        Count, Meta(description="Which try of this step it is, from 1; retries and loop passes count up.")
    ] = 1
    options: Annotated[
        ChatOptions, Meta(description="Sampling, tools and output-format options of an OpenAI-style caller.")
    ] = ChatOptions()
    stream_to: Annotated[
        Id,
        Meta(
            description="Where to publish the call's output as it is produced (StreamChunk messages, core NATS); "
            "empty: no stream, only the result. A message on <stream_to>.cancel stops the call."
        ),
    ] = ""
    key_id: Annotated[
        Id, Meta(description="The virtual key the call came in with (the gateway's); its cap binds the call.")
    ] = ""
    policy: Annotated[
        Id,
        Meta(
            description="The routing policy to pick the model with (rules, learned, cascade or fixed:<model>; the "
            "gateway sends a virtual key's for its frugalmesh/auto calls); empty: the tenant's or workflow's."
        ),
    ] = ""
    agent: Annotated[
        Id,
        Meta(
            description="The agent service making the call (its name, AgentRequest.agent): its usage row is "
            "metered with it, and layer 2 counts its calls per task; empty: the planner's or the gateway's call."
        ),
    ] = ""


class InferenceRequest(WireMessage, kw_only=True):
    """One model call (``mesh.infer.local.<model>`` / ``mesh.infer.cloud.<provider>``), sent by the router."""

    call_id: Annotated[
        Id,
        Meta(
            description="The call's id, new per call, set by the router; also the usage event's event_id "
            "and the id of the call's reservation."
        ),
    ]
    task_id: Annotated[Id, Meta(description="The task (StepRequest.task_id).")]
    step_id: Annotated[Id, Meta(description="The step (StepRequest.step_id).")]
    tenant: Annotated[
        Id, Meta(description="The task's tenant; the usage event is published on mesh.usage.<tenant>.")
    ] = "default"
    attempt: Annotated[Count, Meta(description="The step's try (StepRequest.attempt).")] = 1
    model: Annotated[
        Id,
        Meta(
            description="Exactly the model to run (a deploy/models.toml name): the service runs this model or "
            "fails the call, never another."
        ),
    ]
    tier: Annotated[Tier, Meta(description="The model's tier: local, mid or frontier.")]
    messages: Annotated[
        Annotated[list[ChatMessage], Meta(max_length=MAX_ITEMS)], Meta(description="The prompt (StepRequest.messages).")
    ]
    max_tokens: Annotated[MaxTokens, Meta(description="The most output tokens to generate.")] = 512
    options: Annotated[ChatOptions, Meta(description="The step's ChatOptions, as the router received them.")] = (
        ChatOptions()
    )
    stream_to: Annotated[
        Id, Meta(description="StepRequest.stream_to: where the inference service publishes StreamChunks.")
    ] = ""
    key_id: Annotated[Id, Meta(description="The virtual key of the call (StepRequest.key_id).")] = ""
    response_schema: Annotated[
        JsonObject | None,
        Meta(description="The JSON Schema the output must follow (StepRequest.response_schema); null: free text."),
    ] = None
    deadline_ms: Annotated[
        TimeMs,
        Meta(
            description="When the call must be done, ms since the Unix epoch; the service cancels it then and "
            "meters a timeout."
        ),
    ]
    reservation_id: Annotated[
        Id | None,
        Meta(description="The budget reservation covering this paid call (Reservation.id); null for a free call."),
    ] = None
    grant: Annotated[
        Text,
        Meta(
            description="The accountant's signed grant for this paid call (ReservationDecision.grant), copied by the "
            "router: the inference service runs a paid call only if the grant verifies with the accountant's public "
            "key and names this call id, tenant, task, model and virtual key, covers the call's worst case and has "
            "not expired; empty for a free call."
        ),
    ] = ""
    spilled_from: Annotated[
        Id,
        Meta(
            description="Set by the router when the local tier's queue would break the deadline: the local model "
            "this call was meant for, so the usage row says the call spilled over; empty otherwise."
        ),
    ] = ""
    agent: Annotated[Id, Meta(description="The agent service that made the call (StepRequest.agent); empty: none.")] = (
        ""
    )


class Usage(msgspec.Struct, kw_only=True):
    """The tokens of one call, as the provider reported them or estimated (UsageEvent.usage_source)."""

    input_tokens: Annotated[Count, Meta(description="Prompt tokens, cached ones included.")] = 0
    cached_input_tokens: Annotated[
        Count,
        Meta(description="The part of input_tokens the provider served from its prompt cache (the cached price)."),
    ] = 0
    output_tokens: Annotated[Count, Meta(description="Generated tokens.")] = 0


ErrorKind = Literal[
    "invalid", "timeout", "killed", "refused", "provider", "unavailable", "pinning", "cancelled", "agent"
]


class ErrorInfo(msgspec.Struct, kw_only=True):
    """Why a request failed, set by the service that failed it."""

    kind: Annotated[
        ErrorKind,
        Meta(
            description="The class of failure: invalid (a bad request or reply), timeout (the deadline passed), "
            "killed (the kill switch), refused (a cap, pacing or throttling), provider (the model's provider "
            "failed), unavailable (no service or provider answered), pinning (the model cannot run as asked), "
            "cancelled (the caller went away), agent (an agent service failed its step)."
        ),
    ]
    message: Annotated[Text, Meta(description="What went wrong, in words, for people and logs.")]
    retryable: Annotated[
        bool, Meta(description="Whether the same request may succeed if sent again (e.g. nobody answered).")
    ] = False


class Rejection(WireMessage, kw_only=True):
    """The reply to a request the service could not accept (undecodable, invalid, refused before
    any work): every request/reply subject of the mesh answers this instead of its reply type, so
    a requester gets the reason at once rather than a time-out."""

    error: Annotated[ErrorInfo, Meta(description="Why the request was not accepted.")]


class InferenceResult(WireMessage, kw_only=True):
    """The answer to an InferenceRequest, from the inference service (also the router's reply to a
    StepRequest: the router answers itself for cache hits and calls it stopped or got no answer to)."""

    call_id: Annotated[Id, Meta(description="The call (InferenceRequest.call_id).")]
    model: Annotated[
        Id,
        Meta(
            description="The model asked for (InferenceRequest.model); empty when the router refused the step "
            "before choosing one."
        ),
    ]
    provider_model: Annotated[
        Id,
        Meta(
            description="The model the provider says it ran; empty when it did not say. A model other than the one "
            "asked for is recorded, and fails the call under strict pinning."
        ),
    ] = ""
    tier: Annotated[Tier, Meta(description="The model's tier.")]
    provider: Annotated[
        Id, Meta(description="The provider that served the call (deploy/models.toml); empty when none was chosen.")
    ] = ""
    output: Annotated[Text, Meta(description="The model's reply text; empty on error.")] = ""
    tool_calls: Annotated[
        Annotated[list[ToolCall], Meta(max_length=MAX_ITEMS)] | None,
        Meta(description="The tool calls the model made (finish_reason tool_calls); null: none."),
    ] = None
    finish_reason: Annotated[
        Id, Meta(description="Why generation stopped, as the engine or provider says (stop, length); empty on error.")
    ] = ""
    usage: Annotated[
        Usage,
        Meta(description="The tokens the call used; the worst case when the call started but the provider never said."),
    ] = msgspec.field(default_factory=Usage)
    latency_ms: Annotated[
        Quantity, Meta(description="How long the call took, in ms, from the answering service taking it to its result.")
    ] = 0.0
    cost_usd: Annotated[
        Usd, Meta(description="What the call cost, in USD at deploy/models.toml prices; 0 on a cache hit.")
    ] = 0.0
    cache_hit: Annotated[
        bool, Meta(description="Whether the router answered from its exact-match cache (no model ran).")
    ] = False
    error: Annotated[ErrorInfo | None, Meta(description="Why the call failed; null when it succeeded.")] = None
    graded: Annotated[
        bool | None,
        Meta(description="Replay backends only: whether the recorded answer was graded correct; null otherwise."),
    ] = None
    ttft_ms: Annotated[
        Quantity,
        Meta(
            description="Time to first token, in ms: from the service taking the call to the engine's first "
            "output token; 0 when not streamed."
        ),
    ] = 0.0
    spilled_from: Annotated[
        Id, Meta(description="The local model a spilled call was meant for (InferenceRequest.spilled_from).")
    ] = ""


class StreamChunk(WireMessage, kw_only=True):
    """A piece of a call's output as the engine produced it, published by the inference service on the
    call's ``stream_to`` subject (core NATS, in order). The call's InferenceResult, the reply, stays the
    one complete answer and the one that is metered; chunks only let a caller show tokens early."""

    call_id: Annotated[Id, Meta(description="The call (InferenceRequest.call_id).")]
    seq: Annotated[Count, Meta(description="Its position in the call's stream, from 0: a gap means a lost chunk.")]
    content: Annotated[Text, Meta(description="More of the reply text.")] = ""
    tool_calls: Annotated[
        Annotated[list[ToolCallDelta], Meta(max_length=MAX_ITEMS)] | None,
        Meta(description="More of the tool calls; null: none in this piece."),
    ] = None


Outcome = Literal["ok", "error", "timeout", "killed", "cancelled", "cache_hit", "refused"]
UsageSource = Literal["provider", "counted", "estimated"]


class UsageEvent(WireMessage, kw_only=True):
    """Exactly one per call, whatever its outcome (``mesh.usage.<tenant>``), published by the service that
    answered the call: an inference service, or the router for cache hits, refusals and unanswered calls."""

    event_id: Annotated[
        Id,
        Meta(
            description="The de-duplication key (sent as Nats-Msg-Id): the call's id, so the router's and an "
            "inference service's rows for one call are stored once."
        ),
    ]
    time_ms: Annotated[TimeMs, Meta(description="When the call was metered, ms since the Unix epoch.")]
    tenant: Annotated[Id, Meta(description="The task's tenant.")]
    task_id: Annotated[Id, Meta(description="The task.")]
    step_id: Annotated[Id, Meta(description="The step; empty when unknown.")] = ""
    call_id: Annotated[Id, Meta(description="The call (InferenceRequest.call_id); empty when unknown.")] = ""
    service: Annotated[
        Id, Meta(description="The service that metered the call: router, local-inference or cloud-inference.")
    ]
    tier: Annotated[Tier, Meta(description="The model's tier.")]
    provider: Annotated[Id, Meta(description="The provider that served, or would have served, the call.")]
    model: Annotated[
        Id,
        Meta(description="The model that ran: the provider's reported model when it gave one, else the one asked for."),
    ]
    requested_model: Annotated[
        Id, Meta(description="The model the call asked for; differs from model only if the provider ran another.")
    ]
    input_tokens: Annotated[Count, Meta(description="Prompt tokens, cached ones included.")] = 0
    cached_input_tokens: Annotated[
        Count, Meta(description="The part of input_tokens served from the provider's prompt cache.")
    ] = 0
    output_tokens: Annotated[Count, Meta(description="Generated tokens.")] = 0
    cost_usd: Annotated[
        Usd, Meta(description="What the call cost, in USD; 0 for a cache hit and a call that never started.")
    ] = 0.0
    latency_ms: Annotated[
        Quantity, Meta(description="How long the call took, in ms, as the metering service measured it.")
    ] = 0.0
    outcome: Annotated[
        Outcome,
        Meta(
            description="How the call ended: ok, error, timeout (its deadline passed), killed (the kill switch), "
            "cancelled (its streaming caller went away), cache_hit (the router's cache answered) or refused "
            "(a cap, pacing or throttling)."
        ),
    ]
    usage_source: Annotated[
        UsageSource,
        Meta(
            description="provider: the token counts are the provider's; counted: the mesh counted what was "
            "sent and streamed with the model's tokenizer (a stream stopped early); estimated: nobody knows "
            "(e.g. the call failed after it started), so they are the worst case, never zero."
        ),
    ] = "provider"
    hardware_profile: Annotated[
        Id,
        Meta(description="The hardware profile (deploy/hardware.toml) that priced a local call; empty: list prices."),
    ] = ""
    spilled_from: Annotated[
        Id, Meta(description="The local model a spilled call was meant for (InferenceRequest.spilled_from).")
    ] = ""
    key_id: Annotated[
        Id, Meta(description="The virtual key the call came in with (VirtualKey.id); empty: not a gateway call.")
    ] = ""
    agent: Annotated[
        Id, Meta(description="The agent service that made the call (StepRequest.agent); empty: not an agent's call.")
    ] = ""
    ttft_ms: Annotated[
        Quantity,
        Meta(description="Time to first token, in ms (InferenceResult.ttft_ms); 0 when not measured (not streamed)."),
    ] = 0.0


class Reservation(WireMessage, kw_only=True):
    """Reserve a call's worst-case cost, or settle it (``mesh.budget.reserve|settle``): the router sends it
    before and after each paid call, and the accountant answers a ReservationDecision."""

    id: Annotated[
        Id,
        Meta(
            description="The reservation's id, the call's id (InferenceRequest.call_id); a repeated reserve or "
            "settle of one id counts once."
        ),
    ]
    tenant: Annotated[Id, Meta(description="The task's tenant, whose caps apply.")]
    task_id: Annotated[Id, Meta(description="The task, whose cap (task_budget_usd) applies.")]
    model: Annotated[Id, Meta(description="The model the call runs on, whose caps apply.")]
    amount_usd: Annotated[
        Usd,
        Meta(
            description="The call's worst-case cost in USD (its prompt and max_tokens of output at list prices), "
            "held against every cap until settled."
        ),
    ]
    expires_ms: Annotated[
        TimeMs,
        Meta(
            description="When an unsettled hold lapses, ms since the Unix epoch: the call's deadline, after which "
            "it cannot still be running."
        ),
    ]
    task_budget_usd: Annotated[
        Usd | None,
        Meta(description="The task's own cap in USD (Task.budget_usd), which only the caller knows; null: no cap."),
    ] = None
    actual_usd: Annotated[
        Usd | None,
        Meta(description="Set on settle: what the call really cost, in USD; null settles at amount_usd."),
    ] = None
    key_id: Annotated[
        Id, Meta(description="The virtual key of the call (VirtualKey.id), whose caps also apply; empty: none.")
    ] = ""
    prompt_digest: Annotated[
        Id,
        Meta(
            description="A digest of the call's messages, tools and max_tokens (the router's, see "
            "services/runtime/grants.py): the grant binds it, so the inference service checks the prompt it was "
            "sent is the one reserved for without counting its tokens again. Ignored on a settle."
        ),
    ] = ""


class ReservationDecision(WireMessage, kw_only=True):
    """The accountant's answer to a Reservation, reserve or settle."""

    id: Annotated[Id, Meta(description="The reservation (Reservation.id).")]
    granted: Annotated[
        bool, Meta(description="Whether the hold was granted (reserve) or the settle recorded (settle).")
    ]
    reason: Annotated[
        Text,
        Meta(
            description="Why not, when refused (the cap or kill switch that binds); a note such as "
            "'already reserved' on a repeat; empty otherwise."
        ),
    ] = ""
    grant: Annotated[
        Text,
        Meta(
            description="On a granted reserve: the accountant's Ed25519-signed grant (services/runtime/grants.py: "
            "base64url claims '.' base64url signature; the claims name the call id, tenant, task, model, virtual key, "
            "the worst case in picodollars and the expiry), which the caller puts in InferenceRequest.grant; empty "
            "otherwise."
        ),
    ] = ""


KillScope = Literal["global", "tenant", "task", "model", "key"]


class KillSwitch(WireMessage, kw_only=True):
    """Trip or clear the kill switch for a scope (``mesh.control.kill``): an operator does it
    (``frugalmesh kill``), and the accountant does when spend crosses a cap."""

    scope: Annotated[
        KillScope,
        Meta(description="What it stops: every paid call (global), or one tenant's, task's, model's or key's."),
    ]
    key: Annotated[
        Id,
        Meta(
            description="The tenant, <tenant>.<task id>, model or key id the scope names; '*' for global "
            "(task ids are unique only within their tenant)."
        ),
    ] = "*"
    tripped: Annotated[
        bool,
        Meta(
            description="true trips the switch: no new paid call starts in the scope and calls in flight are "
            "cancelled; false clears it."
        ),
    ]
    reason: Annotated[Text, Meta(description="Why, in words; every refusal it causes quotes it.")] = ""
    by: Annotated[
        Id,
        Meta(
            description="Who set it: accountant for a crossed cap, else the operator whose subject "
            "(<prefix>.operator.<name>.kill) the accountant took it from."
        ),
    ] = ""
    time_ms: Annotated[TimeMs, Meta(description="When it was set, ms since the Unix epoch.")]


PaceAction = Literal["normal", "downgrade", "throttle"]


class PaceSignal(WireMessage, kw_only=True):
    """Month-to-date spend against the month's budget curve (``mesh.control.pace``), from the accountant."""

    tenant: Annotated[Id, Meta(description="The tenant it is about.")]
    action: Annotated[
        PaceAction,
        Meta(
            description="What the router does for the tenant: normal; downgrade (a cheaper tier); throttle "
            "(also spaces out its paid calls)."
        ),
    ]
    spend_usd: Annotated[Usd, Meta(description="The tenant's settled spend this UTC month, in USD.")]
    curve_usd: Annotated[
        Usd,
        Meta(description="What the curve allows spent by now, in USD: the month cap times the month's elapsed share."),
    ]
    time_ms: Annotated[TimeMs, Meta(description="When the accountant computed it, ms since the Unix epoch.")]


class LocalLoad(WireMessage, kw_only=True):
    """What a local model's engine is doing now, as one local-inference replica sees it
    (``mesh.local.load.<model>``, core NATS, about every 250 ms; the router keeps the latest).

    ``engine`` names whose /metrics the numbers come from (``llamacpp``: llama.cpp's server or the
    embedded engine; ``vllm``); "" when the engine has none (a replay model) or could not be read,
    and then only ``in_flight`` is known.
    """

    model: Annotated[Id, Meta(description="The local model (a deploy/models.toml name).")]
    replica: Annotated[
        Id, Meta(description="The local-inference process that measured it: replicas report separately.")
    ]
    engine: Annotated[
        Id, Meta(description="Whose /metrics the numbers come from: llamacpp or vllm; empty when none was read.")
    ] = ""
    endpoint: Annotated[
        Text,
        Meta(description="The /metrics URL read: replicas reporting the same endpoint report the same engine."),
    ] = ""
    running: Annotated[Count, Meta(description="Requests the engine is generating for now.")] = 0
    waiting: Annotated[Count, Meta(description="Requests queued at the engine, not started yet.")] = 0
    kv_cache_usage: Annotated[Share, Meta(description="Share of the engine's KV cache in use, 0 to 1.")] = 0.0
    decode_tokens_per_s: Annotated[
        Quantity | None,
        Meta(description="Recent decoding speed of one sequence, output tokens per second; null: not measured yet."),
    ] = None
    in_flight: Annotated[
        Count, Meta(description="Calls this replica has sent to the model and not yet had answered.")
    ] = 0
    time_ms: Annotated[TimeMs, Meta(description="When the replica measured it, ms since the Unix epoch.")]


BudgetScope = Literal["global", "tenant", "model", "key"]
BudgetWindow = Literal["day", "month"]
# Spend is also kept per task (a task's budget_usd is its cap), for as long as the task runs.
SpendScope = Literal["global", "tenant", "model", "key", "task"]
SpendWindow = Literal["day", "month", "task"]


class BudgetCap(msgspec.Struct, kw_only=True):
    """The caps of one scope in USD; null means no cap for that window."""

    scope: Annotated[
        BudgetScope,
        Meta(description="Whose spend is capped: all (global), one tenant's, one model's or one virtual key's."),
    ]
    key: Annotated[Id, Meta(description="The tenant, model or key id (VirtualKey.id); '*' for global.")] = "*"
    day_usd: Annotated[Usd | None, Meta(description="Cap on a UTC calendar day's spend, in USD.")] = None
    month_usd: Annotated[Usd | None, Meta(description="Cap on a UTC calendar month's spend, in USD.")] = None


class BudgetUpdate(WireMessage, kw_only=True):
    """Change a scope's caps at run time (``mesh.operator.<name>.budget``); the accountant replies BudgetState.

    A window given here replaces the current cap, a window named in ``unset`` loses its cap,
    and a window in neither keeps what it had. An operator sends it (``frugalmesh budget set``).
    """

    scope: Annotated[
        BudgetScope, Meta(description="Whose caps change: global, one tenant's, one model's or one virtual key's.")
    ]
    key: Annotated[Id, Meta(description="The tenant, model or key id (VirtualKey.id); '*' for global.")] = "*"
    day_usd: Annotated[Usd | None, Meta(description="The new day cap, in USD; null: not changed here.")] = None
    month_usd: Annotated[Usd | None, Meta(description="The new month cap, in USD; null: not changed here.")] = None
    unset: Annotated[
        Annotated[list[BudgetWindow], Meta(max_length=MAX_ITEMS)], Meta(description="The windows whose cap is removed.")
    ] = []
    by: Annotated[
        Id,
        Meta(
            description="Who changed it: the accountant sets the operator's name from the subject the change came "
            "on (<prefix>.operator.<name>.budget), whatever the sender wrote here."
        ),
    ] = ""
    time_ms: Annotated[
        TimeMs, Meta(description="When the accountant applied it, ms since the Unix epoch (0 in a request).")
    ] = 0


class BudgetQuery(WireMessage, kw_only=True):
    """Ask for caps and current spend (``mesh.budget.show``); null matches every scope or key."""

    scope: Annotated[
        SpendScope | None,
        Meta(description="The scope to show; null: every scope but task (tasks are many: shown only when asked)."),
    ] = None
    key: Annotated[Id | None, Meta(description="The tenant, model or task id; null: every key of the scope.")] = None


class BudgetSpend(msgspec.Struct, kw_only=True):
    """Spend of one scope in one period: ``window`` day (period 2025-11-20), month (2025-11) or task."""

    scope: Annotated[
        SpendScope,
        Meta(description="Whose spend: all of it (global), one tenant's, one model's, one key's or one task's."),
    ]
    key: Annotated[Id, Meta(description="The tenant, model or task id; '*' for global.")]
    window: Annotated[
        SpendWindow,
        Meta(description="The UTC day, the UTC month, or task: a task's spend, for as long as the task runs."),
    ]
    period: Annotated[Id, Meta(description="Which day (YYYY-MM-DD) or month (YYYY-MM), UTC; empty for a task.")]
    settled_usd: Annotated[Usd, Meta(description="Settled spend in the period, in USD.")]
    reserved_usd: Annotated[
        Usd, Meta(description="Held by reservations not settled yet (calls in flight, at worst case), in USD.")
    ]
    cap_usd: Annotated[Usd | None, Meta(description="The cap in force, in USD; null: no cap.")] = None


class BudgetState(WireMessage, kw_only=True):
    """The accountant's reply to BudgetQuery and BudgetUpdate; ``error`` set when refused."""

    caps: Annotated[
        Annotated[list[BudgetCap], Meta(max_length=MAX_ITEMS)],
        Meta(description="The caps in force in the scopes asked about."),
    ] = []
    spend: Annotated[
        Annotated[list[BudgetSpend], Meta(max_length=MAX_ITEMS)],
        Meta(description="Spend per scope and window in the current period, capped or not."),
    ] = []
    outstanding: Annotated[
        Count, Meta(description="Reservations held now across every scope (paid calls not settled yet).")
    ] = 0
    time_ms: Annotated[TimeMs, Meta(description="When the accountant answered, ms since the Unix epoch.")] = 0
    error: Annotated[Text | None, Meta(description="Why the update was refused; null otherwise.")] = None


class Artifact(WireMessage, kw_only=True):
    """A typed, content-addressed output of one tenant: ``id`` is the sha256 of its canonical tenant,
    type, version and body.

    The planner (or an agent) puts it on ``mesh.artifact.put``; the artifact store validates the body,
    sets ``id`` and announces it on ``mesh.artifact.created.<type>``. Only its tenant can get it back.
    """

    id: Annotated[
        Id,
        Meta(
            description="The content address, set by the artifact store (a sender leaves it empty): sha256 hex of "
            "the canonical JSON of tenant, type, schema_version and body (two tenants' equal bodies differ)."
        ),
    ] = ""
    tenant: Annotated[
        Id,
        Meta(
            description="The tenant it belongs to (a subject token): the producing task's tenant; a task input's "
            "is its submitter's. Only a get naming this tenant reads it."
        ),
    ] = "default"
    type: Annotated[
        Id, Meta(description="The artifact type (schemas/artifacts.py ARTIFACT_TYPES), which fixes the body.")
    ]
    schema_version: Annotated[
        Count, Meta(description="The version of the type's body schema; the store refuses any other.")
    ] = 1
    task_id: Annotated[Id, Meta(description="The task that produced it; empty when none did.")] = ""
    step_id: Annotated[
        Id, Meta(description="The step that produced it (input for a task input); empty when none did.")
    ] = ""
    calls: Annotated[Ids, Meta(description="The model calls whose output it is (call ids), retries included.")] = []
    parents: Annotated[Ids, Meta(description="The ids of the artifacts it was made from (lineage).")] = []
    body: Annotated[
        JsonObject,
        Meta(description="The content: a JSON object valid for the type; the store fills in defaults before hashing."),
    ]
    cost_usd: Annotated[
        Usd, Meta(description="What the calls that made it cost, in USD (its parents' costs not included).")
    ] = 0.0
    created_ms: Annotated[
        TimeMs, Meta(description="When it was made, ms since the Unix epoch; 0: the store sets it when it stores it.")
    ] = 0


class ArtifactGet(WireMessage, kw_only=True):
    """Read an artifact (``mesh.artifact.get``); the artifact store replies ArtifactReply."""

    id: Annotated[Id, Meta(description="The artifact's id (64 lowercase hex digits).")]
    tenant: Annotated[
        Id,
        Meta(
            description="The tenant asking: the task's (AgentRequest.tenant for an agent). Another tenant's "
            "artifact is refused exactly as a missing one is."
        ),
    ] = "default"


class ArtifactReply(WireMessage, kw_only=True):
    """Reply to put (``ref`` set) and get (``artifact`` set); ``error`` when refused."""

    ref: Annotated[ArtifactRef | None, Meta(description="On put: the stored artifact's id and type.")] = None
    artifact: Annotated[Artifact | None, Meta(description="On get: the artifact, body included.")] = None
    error: Annotated[
        Text | None,
        Meta(
            description="Why the put or get was refused (e.g. an invalid body); a get of another tenant's artifact "
            "gets the same error as a get of a missing one."
        ),
    ] = None


class DeadLetter(WireMessage, kw_only=True):
    """A message a service could not accept, kept whole with the reason (``mesh.dlq.<service>``)."""

    service: Annotated[Id, Meta(description="The service that refused it.")]
    subject: Annotated[Text, Meta(description="The subject it arrived on.")]
    error: Annotated[Text, Meta(description="Why it was refused.")]
    data: Annotated[bytes, Meta(description="The message's bytes exactly as received (base64 in JSON).")]
    headers: Annotated[
        Annotated[dict[Text, Text], Meta(max_length=MAX_ITEMS)], Meta(description="The message's NATS headers.")
    ] = {}
    time_ms: Annotated[TimeMs, Meta(description="When it was refused, ms since the Unix epoch.")]


class VirtualKey(WireMessage, kw_only=True):
    """A gateway credential (``frugalmesh keys create``), stored in the KV bucket ``<prefix>_keys`` under the
    sha256 of its secret: the secret itself is shown once and kept nowhere. The tenant of every call made
    with it comes from here, never from the request."""

    id: Annotated[Id, Meta(description="The key's public id (fmk_...), as listed, revoked and metered.")]
    tenant: Annotated[Id, Meta(description="The tenant its calls belong to: their caps, pace and kill switch.")]
    name: Annotated[Id, Meta(description="A label for people (e.g. ci-bot).")] = ""
    allow_models: Annotated[Ids | None, Meta(description="The only models its calls may run on; null: any.")] = None
    policy: Annotated[
        Id | None, Meta(description="The routing policy for its frugalmesh/auto calls; null: the tenant's.")
    ] = None
    created_ms: Annotated[TimeMs, Meta(description="When it was created, ms since the Unix epoch.")]
    revoked_ms: Annotated[
        TimeMs | None, Meta(description="When it was revoked, ms since the Unix epoch; null: it is live.")
    ] = None
    by: Annotated[Id, Meta(description="Who created it (the CLI sends the user's login name).")] = ""


class AgentRequest(WireMessage, kw_only=True):
    """The planner hands one step to an agent service (``mesh.agent.<name>``, request/reply, queue group
    ``<name>``: replicas share the work). Every field is the planner's. The agent answers AgentResult,
    or a Rejection for a request it cannot read. Its own model calls are StepRequests to the router with
    this task, tenant, deadline and allow-list (and ``agent`` set), so the task's budget binds them."""

    task_id: Annotated[Id, Meta(description="The task the step belongs to (Task.id); also the Mesh-Task header.")]
    step_id: Annotated[
        Id,
        Meta(description="The step's id in the task (a workflow step id; <step>[<i>] for item i of a for_each)."),
    ]
    tenant: Annotated[
        Id, Meta(description="The task's tenant (also the Mesh-Tenant header); its caps bind the agent's calls.")
    ] = "default"
    workflow: Annotated[Id, Meta(description="The task's workflow (Task.workflow).")] = ""
    agent: Annotated[Id, Meta(description="The agent asked (the step's agent name, the subject's last token).")]
    goal: Annotated[Text, Meta(description="The task's goal in words (Task.goal).")] = ""
    inputs: Annotated[
        Annotated[list[ArtifactRef], Meta(max_length=MAX_ITEMS)],
        Meta(
            description="What the step works on: for a for_each step, the one task input of this request; "
            "otherwise the task's inputs (Task.inputs), often none. Read them on mesh.artifact.get."
        ),
    ] = []
    needs: Annotated[
        Annotated[dict[Id, ArtifactRef], Meta(max_length=MAX_ITEMS)],
        Meta(description="The artifacts of the steps this one needs, by step id (the workflow's needs)."),
    ] = {}
    params: Annotated[JsonObject, Meta(description="The step's params table from the workflow file, as written.")] = {}
    artifact: Annotated[
        Id,
        Meta(
            description="The artifact type the step must produce (schemas/artifacts.py): one of the returned "
            "artifacts must be of it, valid for it, or the step is invalid."
        ),
    ]
    budget_left_usd: Annotated[
        Usd | None,
        Meta(
            description="What the task may still spend when the step starts, in USD (the task's cap less what "
            "was spent and what other steps hold); null: no task cap. A call past it is refused."
        ),
    ] = None
    task_budget_usd: Annotated[
        Usd | None,
        Meta(
            description="The task's whole cap in USD (Task.budget_usd, the Mesh-Budget header): send it on as "
            "Mesh-Budget with every model call, which the router reserves against; null: no task cap."
        ),
    ] = None
    deadline_ms: Annotated[
        TimeMs,
        Meta(
            description="When the step must be answered, ms since the Unix epoch (also the Mesh-Deadline header): "
            "the task's deadline or the step's timeout_s, whichever is first. The planner stops waiting then."
        ),
    ]
    allow_models: Annotated[
        Ids | None,
        Meta(
            description="The models the agent's calls may run on (the task's allow-list narrowed by the step's); "
            "null: any. Send it as StepRequest.allow_models: the router never leaves it."
        ),
    ] = None
    attempt: Annotated[
        Count, Meta(description="Which try of this step it is, from 1 (a retry goes to any live instance).")
    ] = 1


class AgentResult(WireMessage, kw_only=True):
    """An agent's answer to an AgentRequest: the artifacts it stored, or why it could not finish (with
    whatever it stored before that). The cost and calls are the agent's own account of its model calls,
    for the task's running totals; the usage rows stay the bill."""

    artifacts: Annotated[
        Annotated[list[ArtifactRef], Meta(max_length=MAX_ITEMS)],
        Meta(
            description="The artifacts the agent stored for the step (mesh.artifact.put), best last; on "
            "success, the last one of the requested type is the step's result."
        ),
    ] = []
    error: Annotated[
        ErrorInfo | None,
        Meta(
            description="Why the step could not finish; null on success. refused / killed / timeout when a "
            "defence stopped the agent's calls, invalid for unusable input, agent for its own failure "
            "(retryable: another try may succeed)."
        ),
    ] = None
    cost_usd: Annotated[
        Usd, Meta(description="What the agent's model calls for this request cost, in USD (their results' sum).")
    ] = 0.0
    calls: Annotated[
        Ids, Meta(description="The ids of the agent's model calls for this request (InferenceResult.call_id).")
    ] = []


AlertKind = Literal["spend", "anomaly", "cap"]


class Alert(WireMessage, kw_only=True):
    """A spend rule of deploy/alerts.toml that fired (``mesh.alert.<tenant>``), from the accountant: at most
    once per rule, scope key and window, also stored in ClickHouse (table alerts) and POSTed to the rule's
    webhook when it names one."""

    alert_id: Annotated[
        Id,
        Meta(
            description="<rule>/<scope key>/<window start, ms> (anomaly rules add /above or /below): the same "
            "alert is never sent twice (sent as Nats-Msg-Id; the alerts table's key)."
        ),
    ]
    time_ms: Annotated[TimeMs, Meta(description="When the accountant saw the rule fire, ms since the Unix epoch.")]
    tenant: Annotated[
        Id,
        Meta(
            description="The tenant whose spend it is (the subject's last token); _mesh when the spend is several "
            "tenants' (a model, agent or global scope used by more than one)."
        ),
    ]
    rule: Annotated[Id, Meta(description="The rule's name: its table [rules.<name>] in deploy/alerts.toml.")]
    kind: Annotated[
        AlertKind,
        Meta(
            description="spend: spend in a window above threshold_usd; anomaly: an hour's spend outside the "
            "band of the trailing hours; cap: spend at a share of the scope's budget cap."
        ),
    ]
    scope: Annotated[
        Id,
        Meta(
            description="What the spend is grouped by: global, tenant, key, agent, model, tier, provider or workflow."
        ),
    ]
    key: Annotated[Id, Meta(description="The scope's value (a tenant, key id, model, ...); '*' for global.")]
    window: Annotated[
        Id,
        Meta(
            description="The window the spend was summed over: a duration (15m, 1h; anomaly rules: 1h), day or month."
        ),
    ]
    window_start_ms: Annotated[TimeMs, Meta(description="Start of the window (UTC-aligned), ms since the Unix epoch.")]
    window_end_ms: Annotated[
        TimeMs, Meta(description="End of the window (exclusive), ms since the Unix epoch; it may still be running.")
    ]
    value_usd: Annotated[Usd, Meta(description="The metered spend in the window when the rule fired, USD.")]
    threshold_usd: Annotated[
        Usd,
        Meta(
            description="What the spend was compared with, USD: the rule's threshold, the band's edge (anomaly) "
            "or the share of the cap (cap)."
        ),
    ]
    detail: Annotated[Text, Meta(description="The alert in words, for a person reading a chat channel.")] = ""


FeedbackSource = Literal["user", "validator", "judge", "label"]


class Feedback(WireMessage, kw_only=True):
    """A verdict on a call's answer (``mesh.feedback.<tenant>``), from any client, the gateway
    (``POST /v1/feedback``), the CLI (``frugalmesh feedback``) or a shadow call's judge; stored in
    ClickHouse beside the calls and joined to them (view ``call_feedback``)."""

    feedback_id: Annotated[
        Id, Meta(description="The de-duplication key (sent as Nats-Msg-Id): the same verdict sent twice counts once.")
    ]
    time_ms: Annotated[TimeMs, Meta(description="When the verdict was given, ms since the Unix epoch.")]
    tenant: Annotated[Id, Meta(description="The tenant whose call it judges.")] = "default"
    call_id: Annotated[
        Id, Meta(description="The judged call (InferenceResult.call_id); empty: the task's calls (task_id).")
    ] = ""
    task_id: Annotated[Id, Meta(description="The judged task, when no call_id is given (or as well).")] = ""
    score: Annotated[
        float,
        Meta(description="How good the answer was, 0 (wrong) to 1 (right); correct/incorrect is 1/0.", ge=0, le=1),
    ]
    source: Annotated[
        FeedbackSource,
        Meta(
            description="Who judged: user (the caller), validator (a checker of the answer), judge (a judge "
            "model comparing a shadow pair) or label (recorded labels, in a replay)."
        ),
    ]
    tag: Annotated[
        Id,
        Meta(
            description="What the call was about (its workflow, a request tag): the online router learns per "
            "tag; empty: the task's workflow, where the mesh knows it."
        ),
    ] = ""
    comment: Annotated[Text, Meta(description="Free text for people; the router does not read it.")] = ""


# Every message a non-Python agent may need a JSON Schema for, by name.
WIRE_MESSAGES: tuple[type[WireMessage], ...] = (
    Rejection,
    StreamChunk,
    VirtualKey,
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
    AgentRequest,
    AgentResult,
    Alert,
    Feedback,
)
