"""The handler both inference services share: check pinning and the deadline, run the backend,
meter exactly one UsageEvent, reply an InferenceResult.

A call whose real usage is unknown (cut off at its deadline after the provider took it, or
failed mid-stream) is metered as estimated, at its worst case: unknown usage is never zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
from faststream import FastStream
from faststream.nats import NatsMessage

from schemas.messages import ErrorInfo, InferenceRequest, InferenceResult, Outcome, Usage, UsageEvent, UsageSource
from schemas.subjects import token
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.inference.backend import Backend, BackendError, BackendFactory, Completion, worst_case_usage
from services.runtime.settings import MeshSettings

ServiceKind = Literal["local", "cloud"]

# Calls in flight per replica: inference is mostly waiting on a model, so one replica overlaps many.
DEFAULT_CONCURRENCY = 64


@dataclass(frozen=True)
class _Metered:
    """How a call ended, before it becomes a UsageEvent and an InferenceResult."""

    outcome: Outcome
    usage: Usage
    usage_source: UsageSource = "provider"
    completion: Completion | None = None
    error: ErrorInfo | None = None


class InferenceService:
    def __init__(self, bus: Bus, kind: ServiceKind, catalog: Catalog, backends: Mapping[str, Backend]) -> None:
        self.bus = bus
        self.kind = kind
        self.catalog = catalog
        self.backends = backends

    async def handle(self, msg: NatsMessage) -> bytes:
        kept = f"kept on {self.bus.subjects.dlq(self.bus.service)}"
        request = await self.bus.decode(msg, InferenceRequest)
        if request is None:
            return self.bus.rejection(f"not a valid InferenceRequest; {kept}")
        try:
            token(request.tenant)
        except ValueError as exc:
            # The tenant names the usage subject; a call that cannot be metered is not run.
            await self.bus.dead_letter(msg.raw_message.subject, msg.body, msg.headers, str(exc))
            return self.bus.rejection(f"{exc}; {kept}")
        with structlog.contextvars.bound_contextvars(call_id=request.call_id, task_id=request.task_id):
            result = await self.run(request, msg.raw_message.subject)
        return encode(result)

    async def run(self, request: InferenceRequest, subject: str) -> InferenceResult:
        started = time.monotonic()
        model = self.catalog.models.get(request.model)
        if model is None or model.service != self.kind or model.subject(self.bus.subjects) != subject:
            served = f"{model.service}-inference on {model.subject(self.bus.subjects)}" if model else "no service"
            error = ErrorInfo(
                kind="pinning",
                message=f"{self.bus.service} on {subject} does not serve model {request.model!r} ({served})",
            )
            return await self._finish(request, model, _Metered("error", Usage(), error=error), started)
        remaining_s = (request.deadline_ms - now_ms()) / 1000
        if remaining_s <= 0:
            error = ErrorInfo(kind="timeout", message="the deadline had passed before the call started")
            return await self._finish(request, model, _Metered("timeout", Usage(), error=error), started)
        metered = await self._call(self.backends[model.provider], model, request, remaining_s)
        return await self._finish(request, model, metered, started)

    async def _call(self, backend: Backend, model: ModelSpec, request: InferenceRequest, timeout_s: float) -> _Metered:
        try:
            # wait_for cancels the call at the deadline; a streaming backend closes its stream.
            completion = await asyncio.wait_for(backend.complete(model, request), timeout_s)
        except TimeoutError:
            error = ErrorInfo(kind="timeout", message=f"cancelled at the deadline after {timeout_s:.3f}s")
            return _Metered("timeout", worst_case_usage(model, request), "estimated", error=error)
        except BackendError as exc:
            error = ErrorInfo(kind=exc.kind, message=exc.message, retryable=exc.retryable)
            if exc.started:
                return _Metered("error", worst_case_usage(model, request), "estimated", error=error)
            return _Metered("error", Usage(), error=error)
        except Exception as exc:
            # A backend bug must still leave its one usage row; whether it billed is unknown.
            self.bus.log.exception("backend_failed", model=model.name)
            error = ErrorInfo(kind="provider", message=f"{type(exc).__name__}: {exc}")
            return _Metered("error", worst_case_usage(model, request), "estimated", error=error)
        return _Metered("ok", completion.usage, completion.usage_source, completion=completion)

    async def _finish(
        self, request: InferenceRequest, model: ModelSpec | None, metered: _Metered, started: float
    ) -> InferenceResult:
        latency_ms = (time.monotonic() - started) * 1000
        cost = model.cost(metered.usage) if model else 0.0
        completion = metered.completion
        provider_model = completion.provider_model if completion else ""
        if provider_model and provider_model != request.model:
            self.bus.log.warning("provider_model_differs", requested=request.model, reported=provider_model)
        tier = model.tier if model else request.tier
        provider = model.provider if model else ""
        await self.bus.publish_usage(
            UsageEvent(
                event_id=request.call_id,
                time_ms=now_ms(),
                tenant=request.tenant,
                task_id=request.task_id,
                step_id=request.step_id,
                call_id=request.call_id,
                service=self.bus.service,
                tier=tier,
                provider=provider,
                model=provider_model or request.model,
                requested_model=request.model,
                input_tokens=metered.usage.input_tokens,
                cached_input_tokens=metered.usage.cached_input_tokens,
                output_tokens=metered.usage.output_tokens,
                cost_usd=cost,
                latency_ms=latency_ms,
                outcome=metered.outcome,
                usage_source=metered.usage_source,
            )
        )
        if metered.error:
            self.bus.log.info("call_failed", kind=metered.error.kind, error=metered.error.message)
        return InferenceResult(
            call_id=request.call_id,
            model=request.model,
            provider_model=provider_model,
            tier=tier,
            provider=provider,
            output=completion.output if completion else "",
            finish_reason=completion.finish_reason if completion else "",
            usage=metered.usage,
            latency_ms=latency_ms,
            cost_usd=cost,
            error=metered.error,
            graded=completion.graded if completion else None,
        )


def create_inference_app(
    settings: MeshSettings,
    kind: ServiceKind,
    factories: Mapping[str, BackendFactory],
    max_concurrency: int = DEFAULT_CONCURRENCY,
) -> FastStream:
    """The FastStream app of ``<kind>-inference``: one backend per provider of this service's models,
    chosen by the provider's ``backend`` in models.toml from ``factories``."""
    service = f"{kind}-inference"
    bus = Bus(settings, service)
    catalog = Catalog.load(settings.deploy_dir)
    backends: dict[str, Backend] = {}
    for provider_name in sorted({m.provider for m in catalog.models.values() if m.service == kind}):
        provider = catalog.providers[provider_name]
        if provider.backend not in factories:
            raise ValueError(
                f"providers.{provider_name}: {service} has no backend {provider.backend!r}; "
                f"it has: {', '.join(sorted(factories))}"
            )
        backends[provider_name] = factories[provider.backend](provider, settings)
    handler = InferenceService(bus, kind, catalog, backends)
    subject = settings.subjects.infer_local_all if kind == "local" else settings.subjects.infer_cloud_all

    @bus.broker.subscriber(subject, queue=service, max_workers=max_concurrency)
    async def infer(msg: NatsMessage) -> bytes:
        return await handler.handle(msg)

    app = bus.app()

    @app.after_shutdown
    async def close_backends() -> None:
        for backend in backends.values():
            await backend.aclose()

    return app
