"""Virtual keys: the gateway's credentials, in the KV bucket ``<prefix>_keys``.

A key is a ``VirtualKey`` stored under the sha256 hex of its secret (``fm-`` and 43 random
url-safe characters, 256 bits): the secret is shown once, by ``frugalmesh keys create``, and
kept nowhere, so reading the bucket gives no credential. The key's public id (``fmk_...``) is
what is listed, revoked, metered and capped (budget scope ``key``). A revoked key stays in the
bucket with ``revoked_ms`` set, so ``keys list`` still shows it and a request with it is told
it was revoked rather than that it is unknown.

``KeyStore`` is the writer and lister (the CLI, ``frugalmesh up``'s development key).
``KeyCache`` is each gateway replica's reader: every key read once at start, then changes
followed through a KV watch (pushed within milliseconds), so a revocation reaches every replica
well within a second and a request is authenticated with one hash and one dictionary lookup,
no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from schemas.messages import VirtualKey
from schemas.subjects import BUCKET_KEYS, token
from services.runtime.bus import Bus, now_ms
from services.runtime.dead_letters import UNREADABLE, entry_subject
from services.runtime.kv_snapshot import current_entries

SECRET_PREFIX = "fm-"
ID_PREFIX = "fmk_"
SECRET_BYTES = 32  # 43 url-safe characters
WATCH_TIMEOUT_S = 10.0


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def secret_hash(secret: str) -> str:
    """The bucket key of a secret: its sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


async def keys_bucket(bus: Bus) -> KeyValue:
    return await bus.key_value(bus.subjects.bucket(BUCKET_KEYS))


async def _read_all(kv: KeyValue) -> dict[str, VirtualKey]:
    """Every readable stored key by its bucket key (the secret's hash); a record that is not a
    VirtualKey is no usable key, and gateway replicas dead-letter it (``KeyCache``)."""
    watcher = await kv.watchall()
    found: dict[str, VirtualKey] = {}
    try:
        # The watcher delivers the last value of every key, then None once it has caught up.
        while (entry := await watcher.updates(timeout=WATCH_TIMEOUT_S)) is not None:
            if entry.operation not in (KV_DEL, KV_PURGE) and entry.value:
                with contextlib.suppress(*UNREADABLE):
                    found[entry.key] = msgspec.json.decode(entry.value, type=VirtualKey)
    finally:
        await watcher.stop()
    return found


class KeyStore:
    """Create, list and revoke keys."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> KeyStore:
        return cls(await keys_bucket(bus))

    async def create(
        self,
        tenant: str,
        *,
        name: str = "",
        allow_models: list[str] | None = None,
        policy: str | None = None,
        by: str = "",
        key_id: str | None = None,
    ) -> tuple[str, VirtualKey]:
        """Store a new key; returns its secret (the only time it exists outside the caller) and the key.
        ``key_id``: the id to give it (the CLI sets the key's caps under that id first)."""
        token(tenant)  # the tenant names usage subjects: refuse one that cannot
        secret = new_secret()
        key = VirtualKey(
            id=key_id or new_key_id(),
            tenant=tenant,
            name=name,
            allow_models=allow_models or None,
            policy=policy,
            created_ms=now_ms(),
            by=by,
        )
        await self.kv.create(secret_hash(secret), msgspec.json.encode(key))
        return secret, key

    async def list(self) -> list[VirtualKey]:
        """Every key, live and revoked, oldest first."""
        return sorted((await _read_all(self.kv)).values(), key=lambda k: (k.created_ms, k.id))

    async def revoke(self, key_id: str) -> VirtualKey:
        """Mark the key revoked (it stays listed); LookupError when no key has that id."""
        for bucket_key, key in (await _read_all(self.kv)).items():
            if key.id == key_id:
                if key.revoked_ms is None:
                    key = msgspec.structs.replace(key, revoked_ms=now_ms())
                    await self.kv.put(bucket_key, msgspec.json.encode(key))
                return key
        raise LookupError(f"no key with id {key_id!r} (`frugalmesh keys list` shows them)")


def new_key_id() -> str:
    return ID_PREFIX + secrets.token_hex(8)


class KeyCache:
    """A replica's view of every key, kept current by a KV watch.

    A value that is not a VirtualKey (written by hand, or by anything else than ``KeyStore``) is
    dead-lettered with the reason and its key dropped: it fails closed (a key whose record cannot be
    read authenticates nothing), and the watch goes on, so a later revocation still arrives."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.by_hash: dict[str, VirtualKey] = {}
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follow: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, bus: Bus) -> KeyCache:
        """Read every key, then follow changes in the background."""
        cache = cls(bus)
        kv = await keys_bucket(bus)
        watcher = cache._watcher = await kv.watchall()
        async for entry in current_entries(bus, bus.subjects.bucket(BUCKET_KEYS), watcher, WATCH_TIMEOUT_S):
            await cache._take(entry)
        cache._follow = asyncio.create_task(cache._follow_updates(watcher))
        return cache

    async def _follow_updates(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                await self._take(entry)

    async def _take(self, entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE):
            self.by_hash.pop(entry.key, None)
            return
        try:
            self.by_hash[entry.key] = msgspec.json.decode(entry.value or b"", type=VirtualKey)
        except UNREADABLE as exc:
            self.by_hash.pop(entry.key, None)
            error = f"virtual key {entry.key}: {exc}"
            await self.bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)

    def lookup(self, secret: str) -> VirtualKey | None:
        """The key of ``secret``, revoked or not; None when there is none."""
        return self.by_hash.get(secret_hash(secret))

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
