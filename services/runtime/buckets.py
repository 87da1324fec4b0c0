"""The get-or-create declarer behind ``Bus.key_value`` and ``Bus.object_store``: one per process, each
bucket bound once and kept.

A bucket missing is created with the caller's history and TTL (KV) and ``replicas`` copies; an
existing one is used as it is, but for its replica count, set to ``replicas`` (FRUGALMESH_REPLICAS:
services/runtime/streams.py), so raising the setting reaches buckets made before.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.runtime.streams import ensure_replicas


class Buckets:
    def __init__(self, jetstream: Callable[[], JetStreamContext], replicas: int) -> None:
        self._jetstream = jetstream  # the Bus's, made once it is connected
        self.replicas = replicas
        self._kv: dict[str, KeyValue] = {}
        self._stores: dict[str, ObjectStore] = {}

    async def key_value(self, bucket: str, *, history: int, ttl_s: float | None) -> KeyValue:
        kv = self._kv.get(bucket)
        if kv is None:
            js = self._jetstream()
            try:
                kv = await js.key_value(bucket)
                await ensure_replicas(js, f"KV_{bucket}", self.replicas)
            except BucketNotFoundError:
                kv = await js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=history, ttl=ttl_s, replicas=self.replicas)
                )
            self._kv[bucket] = kv
        return kv

    async def object_store(self, bucket: str) -> ObjectStore:
        store = self._stores.get(bucket)
        if store is None:
            js = self._jetstream()
            try:
                store = await js.object_store(bucket)
                await ensure_replicas(js, f"OBJ_{bucket}", self.replicas)
            except BucketNotFoundError:
                config = ObjectStoreConfig(bucket=bucket, replicas=self.replicas)
                store = await js.create_object_store(bucket, config=config)
            self._stores[bucket] = store
        return store
