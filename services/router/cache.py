"""The exact-match response cache: a successful InferenceResult per (model, prompt, limits), in NATS KV.

Every router replica shares the one bucket, so a repeat is a hit whichever replica gets it.
"""

from __future__ import annotations

import hashlib

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from structlog.stdlib import BoundLogger

from schemas.messages import InferenceResult, StepRequest
from services.runtime.bus import encode


def cache_key(model: str, step: StepRequest) -> str:
    """sha256 hex of the canonical JSON of everything that decides a model's answer.

    Temperature is always 0 (the router never asks for sampling), and it is part of the key so
    that a future sampled call can never be served a greedy answer.
    """
    canonical = msgspec.json.encode(
        {
            "model": model,
            "messages": step.messages,
            "max_tokens": step.max_tokens,
            "temperature": 0.0,
            "response_schema": step.response_schema,
        },
        order="sorted",
    )
    return hashlib.sha256(canonical).hexdigest()


class ResponseCache:
    """Reads and writes never fail a step: the cache only ever saves a call, so on a KV error the
    call runs (or its result goes uncached) and the error is logged."""

    def __init__(self, kv: KeyValue, log: BoundLogger) -> None:
        self.kv = kv
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
            await self.kv.put(key, encode(result))
        except nats.errors.Error as exc:
            self.log.warning("cache_write_failed", key=key, error=str(exc))
