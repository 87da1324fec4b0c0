"""The OpenAI Chat Completions wire format, as far as the gateway speaks it: msgspec Structs.

Requests decode into ``ChatCompletionRequest``, whose Structs forbid unknown fields: a field
OpenAI documents that the mesh does not honour (``logprobs``, ``n`` above 1, image parts, ...) is
a 400 naming it (``decode_request``), never silently dropped, because an agent that asked for it
would otherwise get an answer made without it and not know. The few response fields a client
echoes back when it appends a reply to its history (``refusal``, ``annotations``, ``audio``,
``function_call``) are accepted only empty, for the same reason.

Responses are Structs too (``ChatCompletion``, ``ChatCompletionChunk``): encoding them is one
msgspec call on the hot path. ``Cost`` is the mesh's addition to both: the call's price and id.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

AUTO_MODEL = "frugalmesh/auto"  # the routed name: the key's (or tenant's) policy picks the model

Role = Literal["system", "developer", "user", "assistant", "tool"]
Empty = Annotated[list[Any], Meta(max_length=0)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request Struct: an unknown field is an error that names it."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str
    function: FunctionCallIn
    type: Literal["function"] = "function"


class MessageIn(_Strict):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Echoed response fields: accepted empty only (see the module docstring).
    refusal: None = None
    annotations: Empty = []
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionSpecIn(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Strict):
    type: Literal["function"]
    function: FunctionSpecIn


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Strict):
    name: str
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The body of ``POST /v1/chat/completions``: every field the gateway honours, nothing else."""

    model: str
    messages: Annotated[list[MessageIn], Meta(min_length=1)]
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    seed: int | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None
    # Accepted as OpenAI validates it (at most 16 string pairs); not recorded yet (no wire field).
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None  # one choice per call: n > 1 is a 400


class RequestError(ValueError):
    """A body the gateway cannot accept: ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`(?: - at `\$\.?([^`]*)`)?")
_AT = re.compile(r"^(.*) - at `\$\.?([^`]*)`$")
_decode = msgspec.json.Decoder(ChatCompletionRequest).decode


def decode_request(body: bytes) -> ChatCompletionRequest:
    """The request in ``body``; RequestError naming the offending field when it is not one we take."""
    try:
        request = _decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = _UNKNOWN.match(text)
        if unknown:
            field, path = unknown.group(1), unknown.group(2)
            param = f"{path}.{field}" if path else field
            message = f"Unrecognized request argument supplied: {param} (not supported by frugalmesh)"
            raise RequestError(message, param) from None
        at = _AT.match(text)
        if at:
            raise RequestError(f"Invalid value for '{at.group(2)}': {at.group(1)}", at.group(2)) from None
        raise RequestError(text, None) from None
    except (msgspec.DecodeError, RecursionError) as exc:  # nesting past Python's stack raises the latter
        raise RequestError(f"The request body is not valid JSON: {exc}", None) from None
    format_ = request.response_format
    schema = format_.json_schema if format_ is not None else None
    if format_ is not None and format_.type == "json_schema" and not (schema and schema.schema):
        raise RequestError("response_format json_schema needs json_schema.schema", "response_format.json_schema")
    return request


# -- responses --


class Cost(msgspec.Struct, kw_only=True):
    """The ``frugalmesh`` field of every completion and of a stream's finishing chunk."""

    cost_usd: float
    call_id: str
    model: str
    tier: str
    cache_hit: bool
    task_id: str


class UsageOut(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


class FunctionCallOut(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCallOut


class MessageOut(msgspec.Struct, kw_only=True):
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCallOut] | None = None
    refusal: None = None


class Choice(msgspec.Struct, kw_only=True):
    message: MessageOut
    finish_reason: str
    index: int = 0
    logprobs: None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut
    frugalmesh: Cost
    object: str = "chat.completion"


class FunctionDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str = ""


class ToolCallDeltaOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    delta: Delta
    finish_reason: str | None = None
    index: int = 0
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One SSE event of a stream; ``usage`` and ``frugalmesh`` only on the finishing ones."""

    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str  # always "chat.completion.chunk": required, or omit_defaults would leave it out
    usage: UsageOut | None = None
    frugalmesh: Cost | None = None
