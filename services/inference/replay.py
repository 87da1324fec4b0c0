"""The replay backend: answers recorded prompts with the recorded outcome of the named model.

It stands in for a provider, so it reports usage as a provider would: input tokens counted with
the model's real tokenizer over the request's messages, output tokens over the recorded answer,
clipped at max_tokens. GSM8K records each model's answer text; MMLU records only whether it
was correct, so the output then says which.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from schemas.messages import ChatMessage, InferenceRequest, Usage
from services.inference.backend import BackendError, Completion, OnDelta
from services.inference.latency import simulate_latency
from services.runtime.catalog import Catalog, ModelSpec, ProviderSpec
from services.runtime.data import Record, load_recorded_outcomes, resolve_data_dir
from services.runtime.settings import MeshSettings
from services.runtime.tokens import count_message_tokens, truncate_tokens

NOT_RECORDED = "the replay backend only answers recorded prompts (GSM8K, MMLU); this prompt is not in the recording"


def first_user_prompt(messages: Sequence[ChatMessage]) -> str | None:
    """The recorded prompt of a request is the content of its first user message."""
    return next((m.content for m in messages if m.role == "user"), None)


def index_records(records: Iterable[Record]) -> dict[str, Record]:
    """Records by prompt. A few MMLU questions appear in two domains; the first one read wins,
    so the answer to a prompt is the same in every process."""
    index: dict[str, Record] = {}
    for record in records:
        index.setdefault(record.prompt, record)
    return index


@cache
def _recorded_index(data_dir: Path) -> dict[str, Record]:
    # Shared by every replay provider of the process: the recording is read once.
    return index_records(load_recorded_outcomes(data_dir))


def replay(record: Record, model: ModelSpec, messages: Sequence[ChatMessage], max_tokens: int) -> Completion:
    """The completion ``model`` gave for ``record``, priced in ``model``'s own tokens."""
    column = model.recorded_as
    if column is None or column not in record.correct:
        raise BackendError("unavailable", f"model {model.name} has no recorded outcomes ({column=})")
    correct = record.correct[column]
    text = record.responses.get(column) or f"(recorded outcome: {'correct' if correct else 'incorrect'})"
    output, output_tokens = truncate_tokens(model.tokenizer, text, max_tokens)
    return Completion(
        output=output,
        finish_reason="length" if output != text else "stop",
        # The replay backend serves the catalogue's model itself, so that is the model it reports.
        provider_model=model.name,
        usage=Usage(input_tokens=count_message_tokens(model.tokenizer, messages), output_tokens=output_tokens),
        graded=correct,
    )


class ReplayBackend:
    def __init__(self, records: dict[str, Record]) -> None:
        self.records = records

    @classmethod
    def from_provider(cls, provider: ProviderSpec, settings: MeshSettings) -> ReplayBackend:
        return cls(_recorded_index(resolve_data_dir(settings.data)))

    async def complete(
        self, model: ModelSpec, request: InferenceRequest, on_delta: OnDelta | None = None
    ) -> Completion:
        """The recorded answer, whole (nothing is streamed: ``on_delta`` is not called; tools are ignored)."""
        prompt = first_user_prompt(request.messages)
        record = self.records.get(prompt) if prompt is not None else None
        if record is None:
            raise BackendError("unavailable", NOT_RECORDED)
        completion = replay(record, model, request.messages, request.max_tokens)
        await simulate_latency(model, completion.usage)
        return completion

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class Baseline:
    """The same prompts sent one call each to the frontier model: what the mesh is measured against."""

    tier: str
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    accuracy: float


def frontier_baseline(catalog: Catalog, records: Sequence[Record], max_tokens: int = 512) -> Baseline:
    """Price ``records`` on the cheapest recorded frontier model, each prompt as one user message,
    with the replay backend's own token counts and the catalogue's prices."""
    candidates = [m for m in catalog.in_tier("frontier") if m.recorded_as]
    if not candidates:
        raise ValueError("the catalogue has no frontier model with recorded outcomes")
    model = min(candidates, key=lambda m: (m.output_usd_per_mtok, m.input_usd_per_mtok))
    input_tokens = output_tokens = correct = 0
    cost = 0.0
    for record in records:
        completion = replay(record, model, [ChatMessage(role="user", content=record.prompt)], max_tokens)
        input_tokens += completion.usage.input_tokens
        output_tokens += completion.usage.output_tokens
        cost += model.cost(completion.usage)
        correct += bool(completion.graded)
    return Baseline(
        tier=model.tier,
        model=model.name,
        calls=len(records),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost,
        accuracy=correct / len(records) if records else 0.0,
    )
