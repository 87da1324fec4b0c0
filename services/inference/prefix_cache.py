"""A serving engine's automatic prefix cache, for the stand-in backends (synthetic) to report.

vLLM's automatic prefix caching, and the prompt caching of hosted APIs, keep the attention state
of the prompts they served in fixed-size blocks of tokens; a later prompt that starts with the
same blocks reuses them: that part is not prefilled again (a shorter time to first token) and
some providers bill it at a cached-input price. A block is known by its tokens and every token
before it, so two prompts share cached blocks exactly as far as their token prefixes agree.
With this cache the synthetic backend reports the ``cached_input_tokens`` a real engine would for
recorded traffic (Mooncake's shared prefixes), and the latency model skips their prefill.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# The tokens the cache holds before it evicts the least recently used block: about what the
# KV cache of a vLLM node serving Mixtral-8x7B on 2xA100 holds (roughly 60 GB at 128 KB a token).
CAPACITY_TOKENS = 500_000


class PrefixCache:
    """Whole blocks of ``block_tokens`` tokens, least recently used evicted first."""

    def __init__(self, block_tokens: int, capacity_tokens: int = CAPACITY_TOKENS) -> None:
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, not {block_tokens}")
        self.block_tokens = block_tokens
        self.capacity_blocks = max(1, capacity_tokens // block_tokens)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def serve(self, token_ids: Sequence[int]) -> int:
        """Serve a prompt: return how many of its leading tokens were cached (whole blocks), and
        cache all its whole blocks. A trailing partial block is never cached, as in vLLM."""
        size = self.block_tokens
        cached = 0
        key = 0
        hit = True
        for start in range(0, len(token_ids) - size + 1, size):
            # The chained hash names the block and the whole prefix before it.
            key = hash((key, *token_ids[start : start + size]))
            if hit and key in self._blocks:
                self._blocks.move_to_end(key)
                cached += size
                continue
            hit = False
            self._blocks[key] = None
            self._blocks.move_to_end(key)  # a block still cached after its prefix was evicted
            if len(self._blocks) > self.capacity_blocks:
                self._blocks.popitem(last=False)
        return cached
