"""The one builder of a usage row (``UsageEvent``): every service that meters a call builds it here.

A call is metered exactly once, whoever ends it (an inference service that ran it, the router that
answered it from the cache, refused it or got no answer), so the row's identity is fixed by the
call and not by the metering service: ``event_id`` is the call id, and JetStream's dedupe on it keeps
one row when two services meter the same call (the router's worst-case row for a call it timed out
on, and the inference service's row for the same call). Tokens come whole from one ``Usage``, so the
row's token counts are always the ones its cost was computed from.

A call whose real usage is unknown (it may have run: cut off, failed mid-stream, unanswered) is
recorded at its worst case, ``worst_case_usage``: unknown usage is never recorded as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from schemas.messages import ChatMessage, Outcome, Tier, Tool, Usage, UsageEvent, UsageSource
from services.runtime.bus import now_ms
from services.runtime.catalog import ModelSpec
from services.runtime.tokens import count_prompt_tokens


class StepOfCall(Protocol):
    """What a row says about the step a call belongs to (a ``StepRequest`` or an ``InferenceRequest``):
    its tenant, task and step, the virtual key it came in with ("" for a call not made through the
    gateway) and the agent service that made it ("" for the planner's and the gateway's calls), so
    spend can be summed per key and per agent whoever metered the call."""

    @property
    def tenant(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def step_id(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def agent(self) -> str: ...


def usage_event(
    step: StepOfCall,
    call_id: str,
    *,
    service: str,
    tier: Tier,
    provider: str,
    model: str,
    requested_model: str,
    usage: Usage,
    cost_usd: float,
    latency_ms: float,
    outcome: Outcome,
    usage_source: UsageSource = "provider",
    hardware_profile: str = "",
    spilled_from: str = "",
    ttft_ms: float = 0.0,
) -> UsageEvent:
    """The usage row of call ``call_id`` of ``step``, stamped now.

    ``model`` is the model that ran (as the provider reported it), ``requested_model`` the one asked
    for; ``hardware_profile`` names the profile that priced a local call ("" for list prices).
    """
    return UsageEvent(
        event_id=call_id,
        time_ms=now_ms(),
        tenant=step.tenant,
        task_id=step.task_id,
        step_id=step.step_id,
        call_id=call_id,
        service=service,
        tier=tier,
        provider=provider,
        model=model,
        requested_model=requested_model,
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=cost_usd,
        latency_ms=latency_ms,
        outcome=outcome,
        usage_source=usage_source,
        hardware_profile=hardware_profile,
        spilled_from=spilled_from,
        key_id=step.key_id,
        agent=step.agent,
        ttft_ms=ttft_ms,
    )


def worst_case_usage(
    model: ModelSpec, messages: Sequence[ChatMessage], max_tokens: int, tools: Sequence[Tool] | None = None
) -> Usage:
    """The usage a call of unknown real usage is recorded as: its whole input (messages and the tools
    offered, counted with the model's tokenizer) and ``max_tokens`` out."""
    return Usage(input_tokens=count_prompt_tokens(model.tokenizer, messages, tools), output_tokens=max_tokens)
