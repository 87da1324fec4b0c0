"""The ``openai`` backend: a call on an OpenAI-compatible Chat Completions API, metered.

The provider's reported usage is the truth; a stream that ends without usage is recorded as
estimated, at the worst case (input counted with the model's tokenizer, max_tokens of output).

The request carries the call's ChatOptions as OpenAI's own fields: temperature (0 when the caller
left it unset: the mesh's repeatable default), top_p, seed, stop, tools, tool_choice, user, and
response_format (a json_schema from the response schema, else json_object when asked). Messages
carry their tool calls, tool call ids and names; an assistant message of tool calls alone has
content null, as the API expects.
"""

from __future__ import annotations

import os
import re
from typing import Any

import msgspec

from schemas.messages import ChatMessage, ChatOptions, InferenceRequest, Usage, UsageSource
from services.inference.backend import BackendError, Completion, OnDelta
from services.inference.openai_client import OpenAIClient, OpenAIError
from services.runtime.catalog import ModelSpec, ProviderSpec
from services.runtime.settings import MeshSettings
from services.runtime.usage import worst_case_usage


class OpenAIBackend:
    def __init__(self, client: OpenAIClient) -> None:
        self.client = client

    @classmethod
    def from_provider(cls, provider: ProviderSpec, settings: MeshSettings) -> OpenAIBackend:
        base_url = provider.url(settings)
        if not base_url:
            raise ValueError(f"providers.{provider.name}: backend 'openai' needs a base_url")
        api_key = None
        if provider.api_key_env:
            api_key = os.environ.get(provider.api_key_env)
            if not api_key:
                # Fail at start, not on the first paid call.
                raise ValueError(f"providers.{provider.name}: {provider.api_key_env} is not set")
        return cls(OpenAIClient(base_url, api_key))

    async def complete(
        self, model: ModelSpec, request: InferenceRequest, on_delta: OnDelta | None = None
    ) -> Completion:
        options = request.options
        try:
            reply = await self.client.chat(
                model.name,
                [wire_message(m) for m in request.messages],
                max_tokens=request.max_tokens,
                temperature=0.0 if options.temperature is None else options.temperature,
                response_format=_response_format(request.response_schema, options.json_object),
                extra=_extra_fields(options),
                on_delta=on_delta,
            )
        except OpenAIError as exc:
            raise BackendError("provider", str(exc), retryable=exc.retryable, started=exc.started) from exc
        source: UsageSource
        if reply.usage is None:
            usage = worst_case_usage(model, request.messages, request.max_tokens, request.options.tools)
            source = "estimated"
        else:
            usage = Usage(
                input_tokens=reply.usage.prompt_tokens,
                cached_input_tokens=reply.usage.cached_tokens,
                output_tokens=reply.usage.completion_tokens,
            )
            source = "provider"
        return Completion(
            output=reply.text,
            finish_reason=reply.finish_reason,
            provider_model=reply.model,
            usage=usage,
            usage_source=source,
            ttft_ms=reply.ttft_s * 1000,
            tool_calls=list(reply.tool_calls) or None,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def wire_message(message: ChatMessage) -> dict[str, Any]:
    """``message`` as the Chat Completions API takes it."""
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = msgspec.to_builtins(message.tool_calls)
        if not message.content:
            wire["content"] = None
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        wire["name"] = message.name
    return wire


def _extra_fields(options: ChatOptions) -> dict[str, Any]:
    """The options the caller set, as OpenAI's request fields (unset ones are not sent)."""
    fields: dict[str, Any] = {
        "top_p": options.top_p,
        "seed": options.seed,
        "stop": options.stop,
        "tools": msgspec.to_builtins(options.tools) if options.tools is not None else None,
        "tool_choice": options.tool_choice,
        "user": options.user or None,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _response_format(schema: dict[str, Any] | None, json_object: bool = False) -> dict[str, Any] | None:
    """Structured output. Not ``strict``: strict mode rejects common schemas (optional fields,
    open objects), and the artifact store validates the body against its schema anyway. Without a
    schema, ``json_object`` asks for any JSON object."""
    if schema is None:
        return {"type": "json_object"} if json_object else None
    # The API wants a name of letters, digits, '_' and '-', at most 64 long.
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
