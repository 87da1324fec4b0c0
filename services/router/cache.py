"""The exact-match response cache: a successful InferenceResult per (model, prompt, options), in NATS KV.

Every router replica shares the one bucket, so a repeat is a hit whichever replica gets it.

The key covers everything that changes the answer: the model, the messages (with their tool calls,
tool call ids and names), max_tokens, the response schema and every ChatOption but ``user`` (who
asks does not change the answer). A sampled call (temperature above 0) is cached only with a
seed: without one, asking again is asking for another answer. A hit streams nothing; a streaming
caller takes the whole answer from the result.

A write is a core NATS publish on the bucket's subject, which JetStream stores without sending an
acknowledgement back: one bus message instead of two, and the reply to the step no longer waits on
it. A write lost on the way costs a later cache miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from structlog.stdlib import BoundLogger

from schemas.messages import ChatOptions, InferenceResult, StepRequest
from schemas.subjects import KV_API
from services.runtime.bus import Bus, encode


def cacheable(step: StepRequest) -> bool:
    """Whether the step's answer is repeatable: greedy (temperature unset or 0), or sampled with a seed."""
    options = step.options
    return not options.temperature or options.seed is not None


def cache_key(model: str, step: StepRequest) -> str:
    """sha256 hex of the canonical JSON of everything that decides a model's answer.

    Temperature is in the key (0 when unset: the mesh's default), so a sampled call is never served
    a greedy answer. The other options enter only when one is set, so a workflow step's key (every
    option at its default) is the same as before options existed, and its cached answers stay valid.
    """
    options = step.options
    rest = msgspec.structs.replace(options, temperature=None, user="")
    canonical = msgspec.json.encode(
        {
            "model": model,
            "messages": step.messages,
            "max_tokens": step.max_tokens,
            "temperature": options.temperature or 0.0,
            "response_schema": step.response_schema,
            **({"options": rest} if rest != ChatOptions() else {}),
        },
        order="sorted",
    )
    return hashlib.sha256(canonical).hexdigest()


class ResponseCache:
    """Reads and writes never fail a step: the cache only ever saves a call, so on a KV error the
    call runs (or its result goes uncached) and the error is logged."""

    def __init__(self, kv: KeyValue, bus: Bus, bucket: str, log: BoundLogger) -> None:
        self.kv = kv
        self.bus = bus
        self.bucket = bucket
        self.log = log

    async def get(self, key: str) -> InferenceResult | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            self.log.warning("cache_read_failed", key=key, error=str(exc))
            return None
        try:
            return msgspec.json.decode(entry.value or b"", type=InferenceResult)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # An entry written by an incompatible schema version: run the call and overwrite it.
            self.log.warning("cache_entry_unreadable", key=key, error=str(exc))
            return None

    async def put(self, key: str, result: InferenceResult) -> None:
        if result.error is not None:
            raise ValueError("only successful results are cached")
        try:
            await self.bus.publish_core(f"{KV_API}.{self.bucket}.{key}", encode(result))
        except nats.errors.Error as exc:
            self.log.warning("cache_write_failed", key=key, error=str(exc))
