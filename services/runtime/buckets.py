"""The get-or-create declarer behind ``Bus.key_value`` and ``Bus.object_store``: one per process, each
bucket bound once and kept.

A bucket missing is created with the caller's history and TTL (KV) and ``replicas`` copies, by a
process whose identity may create it (``identities.stream_rights``: the accountant any, another
service its own, ``creatable_streams``); any other process waits for its creator, up to
``CREATOR_WAIT_S``. An existing one is used as it is, but for its replica count, which the processes
that may change streams set to ``replicas`` (FRUGALMESH_REPLICAS: services/runtime/streams.py), so
raising the setting reaches buckets made before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas.subjects import Subjects
from services.runtime.identities import stream_rights
from services.runtime.streams import ensure_replicas

# How long a process that may not create a bucket waits for its creator (the accountant, as it starts).
CREATOR_WAIT_S = 30.0
POLL_S = 0.25

B = TypeVar("B")


class Buckets:
    def __init__(
        self, jetstream: Callable[[], JetStreamContext], replicas: int, subjects: Subjects, creds: Path | None
    ) -> None:
        self._jetstream = jetstream  # the Bus's, made once it is connected
        self.replicas = replicas
        # What this identity may create when missing (None: any), and whether it updates what exists.
        self.creatable, self.updates = stream_rights(creds, subjects)
        self._kv: dict[str, KeyValue] = {}
        self._stores: dict[str, ObjectStore] = {}

    def _may_create(self, stream: str) -> bool:
        return self.creatable is None or stream in self.creatable

    async def _bind(self, stream: str, get: Callable[[], Awaitable[B]], create: Callable[[], Awaitable[B]]) -> B:
        give_up = time.monotonic() + CREATOR_WAIT_S
        while True:
            try:
                found = await get()
            except BucketNotFoundError:
                if self._may_create(stream):
                    return await create()
                if time.monotonic() > give_up:
                    raise RuntimeError(
                        f"{stream} does not exist and this identity may not create it: the service that owns "
                        "it does when it starts (the accountant, for the control bucket); start the mesh first"
                    ) from None
                await asyncio.sleep(POLL_S)
                continue
            if self.updates:
                await ensure_replicas(self._jetstream(), stream, self.replicas)
            return found

    async def key_value(self, bucket: str, *, history: int, ttl_s: float | None) -> KeyValue:
        kv = self._kv.get(bucket)
        if kv is None:
            js = self._jetstream()
            config = KeyValueConfig(bucket=bucket, history=history, ttl=ttl_s, replicas=self.replicas)
            kv = self._kv[bucket] = await self._bind(
                f"KV_{bucket}", lambda: js.key_value(bucket), lambda: js.create_key_value(config)
            )
        return kv

    async def object_store(self, bucket: str) -> ObjectStore:
        store = self._stores.get(bucket)
        if store is None:
            js = self._jetstream()
            config = ObjectStoreConfig(bucket=bucket, replicas=self.replicas)
            store = self._stores[bucket] = await self._bind(
                f"OBJ_{bucket}", lambda: js.object_store(bucket), lambda: js.create_object_store(bucket, config=config)
            )
        return store
