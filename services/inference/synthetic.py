"""The synthetic backend: answers any prompt with max_tokens tokens of text, after the latency model's delay.

Recorded load traces (Azure, Mooncake) carry sizes, not text, so the replay backend, which only
answers recorded prompts, cannot serve them. This backend stands in for a provider of any size:
the output is common English words that are one token each in both shipped tokenizers, and usage
is counted with the model's real tokenizer, so token counts, prices and the latency model all
see the sizes the trace recorded. A model with ``prompt_cache_block_tokens`` reports the prompt
prefixes its engine would have cached as ``cached_input_tokens`` (``prefix_cache``). Nothing is
spent.
"""

from __future__ import annotations

from schemas.messages import InferenceRequest, Usage
from services.inference.backend import Completion, OnDelta
from services.inference.latency import simulate_latency
from services.inference.prefix_cache import PrefixCache
from services.runtime.catalog import ModelSpec, ProviderSpec
from services.runtime.settings import MeshSettings
from services.runtime.tokens import chat_input_tokens, message_token_ids, truncate_tokens

# One token each (with a leading space) in cl100k and in Mixtral's SentencePiece model; tested.
WORDS: tuple[str, ...] = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
    "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
    "company", "system", "program", "question", "work", "government", "number", "night", "point", "home",
    "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book",
    "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend",
    "father", "power", "hour", "game", "line", "end", "member", "law",
)  # fmt: skip


def synthetic_text(n_words: int, offset: int = 0) -> str:
    """``n_words`` words cycling through WORDS from ``offset``: deterministic, so equal calls give equal answers."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


class SyntheticBackend:
    def __init__(self) -> None:
        # Per model with prompt_cache_block_tokens: what its engine has cached (one per process,
        # as one engine's cache is shared by every call it serves).
        self._prefix_caches: dict[str, PrefixCache] = {}

    @classmethod
    def from_provider(cls, provider: ProviderSpec, settings: MeshSettings) -> SyntheticBackend:
        return cls()

    async def complete(
        self, model: ModelSpec, request: InferenceRequest, on_delta: OnDelta | None = None
    ) -> Completion:
        """``max_tokens`` of text, whole (nothing is streamed: ``on_delta`` is not called)."""
        # A word or two more than asked, cut at max_tokens by the real tokenizer: the count is measured, not assumed.
        text, output_tokens = truncate_tokens(
            model.tokenizer, synthetic_text(request.max_tokens + 2), request.max_tokens
        )
        content = message_token_ids(model.tokenizer, request.messages)
        usage = Usage(
            input_tokens=chat_input_tokens(len(content), len(request.messages)),
            cached_input_tokens=self._cached_tokens(model, content),
            output_tokens=output_tokens,
        )
        await simulate_latency(model, usage)
        return Completion(output=text, finish_reason="length", provider_model=model.name, usage=usage)

    def _cached_tokens(self, model: ModelSpec, content: list[int]) -> int:
        if not model.prompt_cache_block_tokens:
            return 0
        cache = self._prefix_caches.get(model.name)
        if cache is None:
            cache = self._prefix_caches[model.name] = PrefixCache(model.prompt_cache_block_tokens)
        return cache.serve(content)

    async def aclose(self) -> None:
        return None
