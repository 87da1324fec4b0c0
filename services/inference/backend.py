"""What an inference backend is to the service that runs it: one call in, one completion out.

A backend that streams (the ``openai`` backend) also hands each piece of output to ``on_delta`` as
the engine produces it, so the service can relay it to a streaming caller; the completion stays the
one whole answer, and the one that is metered. Backends that answer at once (replay, synthetic)
ignore ``on_delta``: their caller then gets the whole answer from the result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from schemas.messages import ErrorKind, InferenceRequest, ToolCall, ToolCallDelta, Usage, UsageSource
from services.runtime.catalog import ModelSpec, ProviderSpec
from services.runtime.scrub import scrub
from services.runtime.settings import MeshSettings


@dataclass(frozen=True)
class Completion:
    output: str
    finish_reason: str
    # The model the provider says it ran ("" when it did not say).
    provider_model: str
    usage: Usage
    usage_source: UsageSource = "provider"
    # Replay only: whether the recorded answer was graded correct.
    graded: bool | None = None
    # Milliseconds from the backend's request to the first output token (0.0: not streamed).
    ttft_ms: float = 0.0
    # The tool calls the model made (finish_reason tool_calls); None: none.
    tool_calls: list[ToolCall] | None = None


@dataclass(frozen=True)
class OutputDelta:
    """A piece of output as the engine produced it: more text, more of the tool calls, or both."""

    content: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    # The model the provider says produces it ("" when it does not say): strict pinning withholds
    # the pieces of another model, as it withholds its answer.
    provider_model: str = ""


# Receives each OutputDelta of a streaming call, in order, as it arrives.
OnDelta = Callable[[OutputDelta], Awaitable[None]]


class BackendError(Exception):
    """A call that failed. ``started`` means the provider had accepted it, so it may bill for it.

    ``message`` becomes the call's ``ErrorInfo`` message, so it is scrubbed of secrets here, whichever
    backend raised it."""

    def __init__(self, kind: ErrorKind, message: str, *, retryable: bool = False, started: bool = False) -> None:
        message = scrub(message)
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.retryable = retryable
        self.started = started


class Backend(Protocol):
    async def complete(
        self, model: ModelSpec, request: InferenceRequest, on_delta: OnDelta | None = None
    ) -> Completion:
        """Run ``request`` on exactly ``model``; raise BackendError on failure. A streaming backend
        awaits ``on_delta`` with each piece of output (backends that answer at once never call it)."""
        ...

    async def aclose(self) -> None: ...


# Builds the backend of one provider; ``[providers.X] backend = "<name>"`` picks the factory.
BackendFactory = Callable[[ProviderSpec, MeshSettings], Backend]
