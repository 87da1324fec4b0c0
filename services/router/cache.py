"""The exact-match response cache: a successful InferenceResult per tenant and (model, prompt, options),
in NATS KV.

Every router replica shares the one bucket, so a repeat is a hit whichever replica gets it.

The cache is per tenant: an entry is kept under ``<tenant>.<digest>``, so a tenant is only ever
served its own answers, and a hit (instant, $0) never tells one tenant what another asked. Sharing
answers across tenants is an explicit setting, ``[cache] share_across_tenants = true`` in
deploy/routing.toml (``CacheConfig``; false when left out, any other key or type refused): then
an entry is kept under ``<digest>`` alone and any tenant's repeat is a hit. Entries of the other
setting are never read, so switching it only costs misses until they expire.

The digest covers everything that changes the answer: the model, the messages (with their tool
calls, tool call ids and names), max_tokens, the response schema and every ChatOption but ``user``
(which of a tenant's users asks does not change the answer). A sampled call (temperature above 0) is cached only with a
seed: without one, asking again is asking for another answer. A hit streams nothing; a streaming
caller takes the whole answer from the result.

A write is a core NATS publish on the bucket's subject, which JetStream stores without sending an
acknowledgement back: one bus message instead of two, and the reply to the step no longer waits on
it. A write lost on the way costs a later cache miss, never a wrong answer.

An entry that is not a successful ``InferenceResult`` (another schema version, a garbled or hostile
write, an error result, which is never cached) is dead-lettered and read as a miss: the call runs
and its answer overwrites the entry.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from structlog.stdlib import BoundLogger

from schemas.messages import ChatOptions, InferenceResult, StepRequest
from schemas.subjects import KV_API
from services.routing.table import ROUTING_FILE
from services.runtime.bus import Bus, encode
from services.runtime.dead_letters import UNREADABLE, entry_subject


@dataclass(frozen=True)
class CacheConfig:
    """routing.toml's ``[cache]``: ``share_across_tenants`` (default false) serves one tenant's cached
    answers to every tenant."""

    share_across_tenants: bool = False

    @classmethod
    def load(cls, deploy_dir: Path) -> CacheConfig:
        path = deploy_dir / ROUTING_FILE
        return cls.parse(tomllib.loads(path.read_text()), str(path))

    @classmethod
    def parse(cls, raw: dict[str, Any], source: str = ROUTING_FILE) -> CacheConfig:
        section = raw.get("cache", {})
        if not isinstance(section, dict):
            raise ValueError(f"{source}: [cache] must be a table")
        unknown = set(section) - {"share_across_tenants"}
        if unknown:
            raise ValueError(f"{source}: [cache]: unknown keys {sorted(unknown)}; known: ['share_across_tenants']")
        shared = section.get("share_across_tenants", False)
        if not isinstance(shared, bool):
            raise ValueError(f"{source}: [cache] share_across_tenants must be true or false, not {shared!r}")
        return cls(share_across_tenants=shared)


@dataclass(frozen=True)
class CacheKey:
    """Which cached answer a call may be served: the tenant asking (a subject token: the router refuses
    any other), and the digest of what decides the answer."""

    tenant: str
    digest: str


def cacheable(step: StepRequest) -> bool:
    """Whether the step's answer is repeatable: greedy (temperature unset or 0), or sampled with a seed."""
    options = step.options
    return not options.temperature or options.seed is not None


def cache_key(model: str, step: StepRequest) -> CacheKey:
    """The step's tenant, and the sha256 hex of the canonical JSON of everything that decides a model's answer.

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
    return CacheKey(tenant=step.tenant, digest=hashlib.sha256(canonical).hexdigest())


class ResponseCache:
    """Reads and writes never fail a step: the cache only ever saves a call, so on a KV error the
    call runs (or its result goes uncached) and the error is logged. ``share_across_tenants``: keep
    entries under the digest alone (``CacheConfig``)."""

    def __init__(self, kv: KeyValue, bus: Bus, bucket: str, log: BoundLogger, *, share_across_tenants: bool) -> None:
        self.kv = kv
        self.bus = bus
        self.bucket = bucket
        self.log = log
        self.share_across_tenants = share_across_tenants

    def entry(self, key: CacheKey) -> str:
        """The KV key the answer for ``key`` is kept under (a tenant token and a digest: both KV-safe)."""
        return key.digest if self.share_across_tenants else f"{key.tenant}.{key.digest}"

    async def get(self, key: CacheKey) -> InferenceResult | None:
        entry_key = self.entry(key)
        try:
            entry = await self.kv.get(entry_key)
        except KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            self.log.warning("cache_read_failed", key=entry_key, error=str(exc))
            return None
        try:
            cached = msgspec.json.decode(entry.value or b"", type=InferenceResult)
            if cached.error is not None:
                raise ValueError("an error result, and only successful results are cached")
        except (*UNREADABLE, ValueError) as exc:
            error = f"response cache entry {entry_key}: {exc}"
            await self.bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)
            return None
        return cached

    async def put(self, key: CacheKey, result: InferenceResult) -> None:
        if result.error is not None:
            raise ValueError("only successful results are cached")
        entry_key = self.entry(key)
        try:
            await self.bus.publish_core(f"{KV_API}.{self.bucket}.{entry_key}", encode(result))
        except nats.errors.Error as exc:
            self.log.warning("cache_write_failed", key=entry_key, error=str(exc))
