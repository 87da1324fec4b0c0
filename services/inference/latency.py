"""The latency model of the stand-in backends (replay, synthetic): time as a real provider would take.

A load test must hold calls in flight as long as real providers do, or it measures a mesh that
never waits. Per model (``ttft_ms``, ``prefill_tokens_per_s`` and ``output_tokens_per_s`` in
models.toml) a call takes a fixed time to first token, plus its uncached prompt tokens at the
prefill rate, plus its output tokens at the decode rate. All default to off, so tests and
the demo answer at once unless a deploy config asks for realism (deploy/loadtest/models.toml).
"""

from __future__ import annotations

import asyncio

from schemas.messages import Usage
from services.runtime.catalog import ModelSpec


def latency_s(model: ModelSpec, usage: Usage) -> float:
    """Seconds a provider serving ``model`` would take for a call of ``usage``: the fixed time to
    first token, the prefill of the prompt tokens it had not cached, the decode of the output."""
    uncached = usage.input_tokens - usage.cached_input_tokens
    prefill_s = uncached / model.prefill_tokens_per_s if model.prefill_tokens_per_s else 0.0
    decode_s = usage.output_tokens / model.output_tokens_per_s if model.output_tokens_per_s else 0.0
    return model.ttft_ms / 1000 + prefill_s + decode_s


async def simulate_latency(model: ModelSpec, usage: Usage) -> None:
    """Wait as long as the provider would; cancelled with the call (deadline, kill) like a real one."""
    delay = latency_s(model, usage)
    if delay > 0:
        await asyncio.sleep(delay)
