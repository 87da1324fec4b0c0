"""The ``openai`` backend: a call on an OpenAI-compatible Chat Completions API, metered.

The provider's reported usage is the truth; a stream that ends without usage is recorded as
estimated, at the worst case (input counted with the model's tokenizer, max_tokens of output).
"""

from __future__ import annotations

import os
import re
from typing import Any

from schemas.messages import InferenceRequest, Usage, UsageSource
from services.inference.backend import BackendError, Completion
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

    async def complete(self, model: ModelSpec, request: InferenceRequest) -> Completion:
        try:
            reply = await self.client.chat(
                model.name,
                [{"role": m.role, "content": m.content} for m in request.messages],
                max_tokens=request.max_tokens,
                temperature=0.0 if request.options.temperature is None else request.options.temperature,
                response_format=_response_format(request.response_schema),
            )
        except OpenAIError as exc:
            raise BackendError("provider", str(exc), retryable=exc.retryable, started=exc.started) from exc
        source: UsageSource
        if reply.usage is None:
            usage, source = worst_case_usage(model, request.messages, request.max_tokens), "estimated"
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
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def _response_format(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """Structured output. Not ``strict``: strict mode rejects common schemas (optional fields,
    open objects), and the artifact store validates the body against its schema anyway."""
    if schema is None:
        return None
    # The API wants a name of letters, digits, '_' and '-', at most 64 long.
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
