"""One GGUF model on llama.cpp, generating one request at a time, token by token.

Generating through ``Llama.generate`` rather than ``create_chat_completion`` is what gives
exact counts: every token sampled is counted here, and the prompt is tokenized exactly as
llama-cpp-python's chat handler would (the GGUF's own chat template, special tokens parsed).
Stop sequences are found in the decoded text, so text that may be the start of one is held back
until it is known not to be; the tokens that made a stop sequence are counted (they were
generated) but not returned, as OpenAI does.
"""

from __future__ import annotations

import codecs
import json
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

# llama.cpp's nucleus sampling mass when a request sets none (it only matters above temperature 0).
DEFAULT_TOP_P = 0.95


class PromptTooLong(ValueError):
    """The prompt leaves no room in the context window for a single output token."""


@dataclass(frozen=True)
class Generation:
    # The chat, already through the model's template and tokenizer (LocalModel.prompt_tokens).
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = DEFAULT_TOP_P
    # The sampler's seed; None: a fresh one per generation.
    seed: int | None = None
    # Sequences that end the output (not included in it).
    stop: tuple[str, ...] = ()
    # A JSON Schema the output must follow, enforced by a grammar while sampling.
    json_schema: dict[str, Any] | None = None


@dataclass
class GenerationStats:
    """How a generation ended, filled in as it runs (read after the token stream ends)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    decode_s: float = 0.0


@dataclass
class Load:
    """What the engine is doing now, for /metrics."""

    processing: int = 0
    deferred: int = 0
    prompt_tokens_total: int = 0
    tokens_predicted_total: int = 0
    # Output tokens per second of decoding (prefill excluded) over the last generation.
    predicted_tokens_seconds: float = 0.0


class LocalModel:
    def __init__(self, path: Path, *, name: str, n_ctx: int = 4096, n_threads: int = 2) -> None:
        self.name = name
        self.llama = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self.n_ctx = n_ctx
        eos_id = self.llama.token_eos()
        bos_id = self.llama.token_bos()
        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{path} carries no chat template (tokenizer.chat_template)")
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llama._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=self.llama._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        self.load = Load()
        # llama.cpp's context is one sequence: generations take turns.
        self._turn = threading.Lock()
        self._load_lock = threading.Lock()

    def kv_cache_usage(self) -> float:
        return self.llama.n_tokens / self.n_ctx

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The chat as the model reads it; raises PromptTooLong when no output would fit."""
        # The formatter only renders the dicts through the GGUF's Jinja template, so any role the
        # template knows works; llama_cpp types messages as its narrower per-role TypedDicts.
        formatted = self.formatter(messages=cast(list[ChatCompletionRequestMessage], list(messages)))
        prompt = self.llama.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        if len(prompt) >= self.n_ctx:
            raise PromptTooLong(f"the prompt is {len(prompt)} tokens; the context window holds {self.n_ctx}")
        return prompt

    def generate(self, request: Generation, outcome: GenerationStats, cancelled: threading.Event) -> Iterator[str]:
        """Text pieces as they are sampled; waits for its turn first. Stops at an end-of-generation
        token, at max_tokens, or soon after ``cancelled`` is set (finish_reason "cancelled")."""
        with self._load_lock:
            self.load.deferred += 1
        try:
            self._turn.acquire()
        finally:
            with self._load_lock:
                self.load.deferred -= 1
        try:
            with self._load_lock:
                self.load.processing += 1
            yield from self._generate(request, outcome, cancelled)
        finally:
            with self._load_lock:
                self.load.processing -= 1
                self.load.prompt_tokens_total += outcome.prompt_tokens
                self.load.tokens_predicted_total += outcome.completion_tokens
                if outcome.decode_s > 0 and outcome.completion_tokens > 1:
                    self.load.predicted_tokens_seconds = (outcome.completion_tokens - 1) / outcome.decode_s
            self._turn.release()

    def _generate(self, request: Generation, outcome: GenerationStats, cancelled: threading.Event) -> Iterator[str]:
        if cancelled.is_set():  # its client left while it waited for its turn
            outcome.finish_reason = "cancelled"
            return
        prompt = request.prompt
        outcome.prompt_tokens = len(prompt)
        # Llama.generate keeps the longest prefix already in the KV cache and evaluates the rest
        # (at least the last prompt token, whose logits it needs): those reused tokens are cached.
        cached = _common_prefix(self.llama._input_ids[: self.llama.n_tokens], prompt)
        outcome.cached_tokens = min(cached, len(prompt) - 1)
        grammar = (
            llama_cpp.LlamaGrammar.from_json_schema(json.dumps(request.json_schema), verbose=False)
            if request.json_schema is not None
            else None
        )
        max_tokens = min(request.max_tokens, self.n_ctx - len(prompt))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopSequences(request.stop)
        vocab = self.llama._model.vocab
        first_token_at: float | None = None
        outcome.finish_reason = "length"
        self.llama.set_seed(request.seed if request.seed is not None else random.randrange(2**32))
        tokens = self.llama.generate(
            prompt, temp=request.temperature, top_p=request.top_p, grammar=grammar, reset=True
        )
        stopped = False
        for token in tokens:
            if first_token_at is None:
                first_token_at = time.monotonic()
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                outcome.finish_reason = "stop"
                break
            outcome.completion_tokens += 1
            text, stopped = stops.feed(decoder.decode(self.llama.detokenize([token])))
            if text:
                yield text
            if stopped:
                outcome.finish_reason = "stop"
                break
            if outcome.completion_tokens >= max_tokens:
                break
            if cancelled.is_set():
                outcome.finish_reason = "cancelled"
                break
        if not stopped:
            text, stopped = stops.feed(decoder.decode(b"", final=True))
            if stopped:
                outcome.finish_reason = "stop"
            text += stops.held()
            if text:
                yield text
        if first_token_at is not None:
            outcome.decode_s = time.monotonic() - first_token_at


class StopSequences:
    """Finds the first stop sequence in text that arrives in pieces."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that may be returned now, and whether a stop sequence ended the output (the text
        is then everything before it). Text that may be the start of a stop sequence is held back."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        found = [i for i in (text.find(stop) for stop in self.stops) if i != -1]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = next(
            (n for n in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1)
             if any(stop.startswith(text[-n:]) for stop in self.stops)),
            0,
        )  # fmt: skip
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def held(self) -> str:
        """What is held back, once the output has ended without a stop sequence."""
        held, self._held = self._held, ""
        return held


def _common_prefix(cached: Iterable[int], prompt: Iterable[int]) -> int:
    n = 0
    for a, b in zip(cached, prompt, strict=False):  # the two differ in length
        if a != b:
            break
        n += 1
    return n
