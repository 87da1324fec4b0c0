"""local-inference tells the routers how loaded each local model is, for spillover.

Every ``interval_s`` (default 250 ms) each replica reads the /metrics of every local model served
by a real engine (providers on the ``openai`` backend: the embedded engine, llama.cpp's server,
vLLM; services/inference/engine_load.py) and publishes one ``LocalLoad`` per local model on
``mesh.local.load.<model>``: the engine's running and waiting requests, KV-cache use and decode
rate, plus the calls this replica has in flight on the model (the only load known for a model
without /metrics, e.g. a replay model).

Core NATS, not a KV bucket: a load is stale within a couple of intervals, so nothing is worth
persisting or replaying to a router that starts later (it has a fresh value within one interval),
and four small publishes a second per model cost no disk writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx
from faststream import FastStream

from schemas.messages import LocalLoad
from services.inference.engine_load import EngineLoadReader, MetricsError, metrics_url
from services.inference.service import InferenceService
from services.runtime.bus import encode, now_ms

DEFAULT_LOAD_INTERVAL_S = 0.25
# Backends that call a real engine, whose /metrics can be read.
ENGINE_BACKENDS = frozenset({"openai"})


class LoadPublisher:
    def __init__(self, service: InferenceService, interval_s: float = DEFAULT_LOAD_INTERVAL_S) -> None:
        self.service = service
        self.bus = service.bus
        self.interval_s = interval_s
        self.replica = uuid.uuid4().hex[:12]
        self.models = sorted(name for name, m in service.catalog.models.items() if m.service == "local")
        self.readers: dict[str, EngineLoadReader] = {}
        for name in self.models:
            provider = service.catalog.providers[service.catalog.models[name].provider]
            base_url = provider.url(self.bus.settings)
            if provider.backend in ENGINE_BACKENDS and base_url:
                # A read slower than two intervals is as good as none.
                timeout_s = max(2 * interval_s, 0.5)
                self.readers[name] = EngineLoadReader(metrics_url(base_url), model=name, timeout_s=timeout_s)
        # Models whose last read failed, so a down engine is logged once, not four times a second.
        self._failing: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="local-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for reader in self.readers.values():
            await reader.aclose()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.publish_once()
            except Exception:
                # A bad tick (the bus reconnecting) must not end the reports for good.
                self.bus.log.exception("local_load_failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def publish_once(self) -> list[LocalLoad]:
        loads = await asyncio.gather(*(self._measure(name) for name in self.models))
        for load in loads:
            await self.bus.publish_core(self.bus.subjects.local_load(load.model), encode(load))
        return loads

    async def _measure(self, model: str) -> LocalLoad:
        in_flight = sum(1 for flight in self.service.in_flight if flight.request.model == model)
        load = LocalLoad(model=model, replica=self.replica, in_flight=in_flight, time_ms=now_ms())
        reader = self.readers.get(model)
        if reader is None:
            return load
        try:
            engine = await reader.read()
        except (httpx.HTTPError, MetricsError) as exc:
            if model not in self._failing:
                self._failing.add(model)
                self.bus.log.warning("engine_metrics_unreadable", model=model, url=reader.url, error=str(exc))
            return load
        if model in self._failing:
            self._failing.discard(model)
            self.bus.log.info("engine_metrics_readable", model=model, url=reader.url)
        return LocalLoad(
            model=model,
            replica=self.replica,
            engine=engine.engine,
            endpoint=reader.url,
            running=engine.running,
            waiting=engine.waiting,
            kv_cache_usage=engine.kv_cache_usage,
            decode_tokens_per_s=engine.decode_tokens_per_s,
            in_flight=in_flight,
            time_ms=now_ms(),
        )


def publish_load(interval_s: float):  # noqa: ANN201 (the setup hook of create_inference_app)
    """The hook that makes local-inference publish its models' load every ``interval_s``."""

    def setup(app: FastStream, service: InferenceService) -> None:
        publisher = LoadPublisher(service, interval_s)
        # After start-up (the broker is connected); stopped before the broker closes.
        app.after_startup(publisher.start)
        app.on_shutdown(publisher.stop)

    return setup
