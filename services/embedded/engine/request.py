"""The chat completion request the engine accepts, and how its messages are shown to the model.

The fields are OpenAI's. The engine honours ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop`` and ``response_format`` (a json_schema, or json_object: any JSON object, by grammar) and
ignores ``user``. It does not run tools: a request that offers ``tools`` is refused (``tools_error``)
rather than answered as if none were offered, so the caller sees why instead of a reply that
never calls them. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

TOOLS_REFUSED = "the embedded engine does not run tools: send this request to a model that does"


class ToolCallFunction(msgspec.Struct):
    name: str = ""
    arguments: str = ""


class ToolCall(msgspec.Struct):
    id: str = ""
    type: str = "function"
    function: ToolCallFunction = msgspec.field(default_factory=ToolCallFunction)


class ChatMessage(msgspec.Struct):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class JsonSchemaFormat(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] = {}


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    messages: list[ChatMessage]
    model: str = ""
    max_tokens: int | None = None
    # null or unset: 0, greedy (the mesh's default, not OpenAI's 1).
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple of non-empty sequences (OpenAI takes one string or a list)."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the output must follow: the json_schema format's, ``{"type": "object"}``
        (any JSON object) for json_object, None for text. ValueError for a json_schema without one."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        if fmt.json_schema is None:
            raise ValueError("response_format json_schema needs a json_schema object")
        return fmt.json_schema.schema

    def tools_error(self) -> str | None:
        """Why the request cannot run here when it offers tools; None when it offers none."""
        return TOOLS_REFUSED if self.tools else None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the model's chat template takes them: roles it knows, text content.

    The template (SmolLM2's, like most small models') knows system, user and assistant only, so:
    a developer message is a system message (OpenAI's newer name for the same thing); a tool
    message becomes a user message prefixed with the id of the tool call it answers, ``[tool result
    for call <id>]``, so the model still reads the result; an assistant message's tool calls are
    written into its text, one ``[tool call <id>] <name>(<arguments>)`` line each, so a later tool
    result has something to refer to.
    """
    shown = []
    for message in messages:
        content = message.content or ""
        role = message.role
        if role == "developer":
            role = "system"
        elif role == "tool":
            role = "user"
            content = f"[tool result for call {message.tool_call_id or ''}] {content}"
        elif role == "assistant" and message.tool_calls:
            calls = [f"[tool call {c.id}] {c.function.name}({c.function.arguments})" for c in message.tool_calls]
            content = "\n".join([content, *calls] if content else calls)
        shown.append({"role": role, "content": content})
    return shown
