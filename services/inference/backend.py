"""What an inference backend is to the service that runs it: one call in, one completion out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from schemas.messages import ErrorKind, InferenceRequest, Usage, UsageSource
from services.runtime.catalog import ModelSpec, ProviderSpec
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


class BackendError(Exception):
    """A call that failed. ``started`` means the provider had accepted it, so it may bill for it."""

    def __init__(self, kind: ErrorKind, message: str, *, retryable: bool = False, started: bool = False) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.retryable = retryable
        self.started = started


class Backend(Protocol):
    async def complete(self, model: ModelSpec, request: InferenceRequest) -> Completion:
        """Run ``request`` on exactly ``model``; raise BackendError on failure."""
        ...

    async def aclose(self) -> None: ...


# Builds the backend of one provider; ``[providers.X] backend = "<name>"`` picks the factory.
BackendFactory = Callable[[ProviderSpec, MeshSettings], Backend]
