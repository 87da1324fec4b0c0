"""Prompt text for a trace row: the recorded number of tokens, with shared prefixes where the trace has them.

A prompt is a run of 512-token blocks. Each block's text is a pure function of its id, so rows
whose ``prefix_ids`` start alike get byte-identical prefixes (what prefix caches and the
exact-match cache key on), and a row without ids gets blocks of its own. The words are each one
token in both shipped tokenizers, so a block of 512 words is 512 tokens for every model.
"""

from __future__ import annotations

import random
from functools import lru_cache

from loadtest.traces import TraceRow
from services.inference.synthetic import WORDS

BLOCK_TOKENS = 512


@lru_cache(maxsize=8192)
def block_words(block_id: str) -> tuple[str, ...]:
    # random.Random seeds a str through sha512: the same id gives the same block in every process.
    rng = random.Random(block_id)
    return tuple(rng.choices(WORDS, k=BLOCK_TOKENS))


def prompt_text(row: TraceRow, row_key: str, salt: str = "") -> str:
    """``row.input_tokens`` words; blocks named by ``row.prefix_ids``, the rest by ``row_key`` (unique per row).

    ``salt`` renames every block: replays with different salts share no text, so the second run
    of a trace does not hit the first run's cached answers."""
    words: list[str] = []
    n_blocks = -(-row.input_tokens // BLOCK_TOKENS)
    for index in range(n_blocks):
        block_id = row.prefix_ids[index] if index < len(row.prefix_ids) else f"{row_key}:{index}"
        words.extend(block_words(salt + block_id)[: row.input_tokens - len(words)])
    return " ".join(words)
