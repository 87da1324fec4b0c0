"""The handler both inference services share (their app: services/inference/app.py): check pinning,
the deadline and the kill switch, run the backend, meter exactly one UsageEvent, reply an InferenceResult.

A call whose real usage is unknown (cut off at its deadline or by the kill switch after the
provider took it, or failed mid-stream) is metered as estimated, at its worst case: unknown
usage is never zero.

A paid call runs only with a grant the accountant signed for it (``InferenceRequest.grant``,
services/runtime/grants.py), checked here with the accountant's public key and no round trip: it
must name this call, tenant, task, model and virtual key, cover the call's worst case (recomputed
as the router reserved it) and not have expired. Without one the call is refused before it starts
and metered once, at $0 (outcome ``refused``); a grant presented again for a call this replica
already ran is refused and not metered again (the call has its row). Free calls need no grant.

The kill switch is obeyed twice: a call is not started while a switch covering it is tripped
(the state is read before the service takes work, so a service started after a trip refuses
too), and a trip cancels every call in flight that it covers; cancelling closes the backend's
stream, which stops the engine generating.

A failed call's error message is scrubbed of secrets (services/runtime/scrub.py) before it is an
``ErrorInfo``: a ``BackendError`` scrubs its own message, and this handler an unexpected exception's.

A call with ``stream_to`` also relays its output as it comes and stops when its caller cancels
(services/inference/streaming.py): such a call is metered ``cancelled``, counted from what was streamed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
from nats.aio.msg import Msg

from schemas.messages import (
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    KillSwitch,
    Outcome,
    Usage,
    UsageSource,
)
from schemas.subjects import token
from services.inference.backend import Backend, BackendError, Completion
from services.inference.streaming import StreamRelay, check_stream_to, listen_for_cancel
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.catalog import Catalog, ModelSpec
from services.runtime.control import ControlState, covers, killed_message
from services.runtime.grants import NO_GRANT, GrantError, GrantReused, GrantVerifier
from services.runtime.reservations import is_paid
from services.runtime.scrub import scrub
from services.runtime.usage import usage_event, worst_case_usage

ServiceKind = Literal["local", "cloud"]


@dataclass(frozen=True)
class _CallEnd:
    """How a call ended, before it becomes a UsageEvent and an InferenceResult."""

    outcome: Outcome
    usage: Usage
    usage_source: UsageSource = "provider"
    completion: Completion | None = None
    error: ErrorInfo | None = None
    # The model the provider reported, kept when strict pinning withholds the completion.
    provider_model: str = ""
    # False only for a reused grant's refusal: its call was metered when it ran.
    metered: bool = True


# eq=False: hashed by identity, so two calls that share a call id are still two entries.
@dataclass(eq=False)
class _RunningCall:
    """A backend call in flight: a trip of a switch that covers it cancels it."""

    request: InferenceRequest
    call: asyncio.Future[Completion]
    # Set by a trip that cancelled the call, so the cancellation is metered as a kill.
    killed_by: KillSwitch | None = None
    # Set when the streaming caller cancelled it, so the cancellation is metered as cancelled.
    cancelled_by_caller: bool = False

    def cancel_for_caller(self) -> None:
        if not self.call.done() and self.killed_by is None:
            self.cancelled_by_caller = True
            self.call.cancel()


def _unknown_usage(outcome: Outcome, model: ModelSpec, request: InferenceRequest, error: ErrorInfo) -> _CallEnd:
    """A call that may have run and whose real usage is unknown: metered as estimated, at its worst case."""
    worst_case = worst_case_usage(model, request.messages, request.max_tokens, request.options.tools)
    return _CallEnd(outcome, worst_case, "estimated", error=error)


class InferenceService:
    def __init__(
        self,
        bus: Bus,
        kind: ServiceKind,
        catalog: Catalog,
        backends: Mapping[str, Backend],
        verifier: GrantVerifier,
    ) -> None:
        self.bus = bus
        self.verifier = verifier
        self.kind = kind
        self.catalog = catalog
        self.backends = backends
        self.strict_pinning = bus.settings.strict_pinning
        self.control: ControlState | None = None
        self.in_flight: set[_RunningCall] = set()

    async def open_control(self) -> None:
        """Read every switch before the first call is taken, then cancel covered calls on each trip."""
        self.control = await ControlState.open(self.bus)
        self.control.on_trip(self._cancel_covered)

    async def close_control(self) -> None:
        if self.control is not None:
            await self.control.close()

    def _cancel_covered(self, switch: KillSwitch) -> None:
        for flight in self.in_flight:
            request = flight.request
            if (
                flight.killed_by is None
                and is_paid(self.catalog.model(request.model))
                and covers(
                    switch, tenant=request.tenant, task_id=request.task_id, model=request.model, key_id=request.key_id
                )
            ):
                flight.killed_by = switch
                flight.call.cancel()

    async def handle(self, msg: Msg) -> bytes:
        kept = f"kept on {self.bus.subjects.dlq(self.bus.service)}"
        request = await self.bus.decode(msg, InferenceRequest)
        if request is None:
            return self.bus.rejection(f"not a valid InferenceRequest; {kept}")
        try:
            token(request.tenant)
            if request.stream_to:
                check_stream_to(request.stream_to, self.bus.subjects)
        except ValueError as exc:
            # The tenant names the usage subject; a call that cannot be metered is not run; nor is
            # one whose chunks would be published where they must not go.
            await self.bus.dead_letter(msg.subject, msg.data, msg.headers, str(exc))
            return self.bus.rejection(f"{exc}; {kept}")
        with structlog.contextvars.bound_contextvars(call_id=request.call_id, task_id=request.task_id):
            result = await self.run(request, msg.subject)
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
            return await self._finish(request, model, _CallEnd("error", Usage(), error=error), started)
        remaining_s = (request.deadline_ms - now_ms()) / 1000
        if remaining_s <= 0:
            error = ErrorInfo(kind="timeout", message="the deadline had passed before the call started")
            return await self._finish(request, model, _CallEnd("timeout", Usage(), error=error), started)
        assert self.control is not None, "open_control runs at startup, before any subscriber"
        switch = self.control.blocked(
            tenant=request.tenant, task_id=request.task_id, model=model.name, key_id=request.key_id
        )
        if switch is not None and is_paid(model):
            # Not started, so nothing was spent: metered once, at $0.
            error = ErrorInfo(kind="killed", message=killed_message(switch))
            return await self._finish(request, model, _CallEnd("killed", Usage(), error=error), started)
        if is_paid(model):
            refusal = self._check_grant(request, model)
            if refusal is not None:
                return await self._finish(request, model, refusal, started)
        ended = await self._call(self.backends[model.provider], model, request, remaining_s)
        return await self._finish(request, model, ended, started)

    def _check_grant(self, request: InferenceRequest, model: ModelSpec) -> _CallEnd | None:
        """None if the request's grant allows this paid call; else the refusal (not started, $0)."""
        try:
            self.verifier.check(request, model, now_ms())
        except GrantError as exc:
            self.bus.log.warning("grant_refused", reason=str(exc))
            error = ErrorInfo(kind="refused", message=f"{NO_GRANT}: {exc}")
            return _CallEnd("refused", Usage(), error=error, metered=not isinstance(exc, GrantReused))
        return None

    async def _call(self, backend: Backend, model: ModelSpec, request: InferenceRequest, timeout_s: float) -> _CallEnd:
        relay = StreamRelay(self.bus, request, strict_pinning=self.strict_pinning) if request.stream_to else None
        # Its own task, so that a trip or the caller's cancel can stop this call alone.
        call = asyncio.ensure_future(backend.complete(model, request, relay.relay if relay else None))
        flight = _RunningCall(request, call)
        self.in_flight.add(flight)
        cancel_sub = None
        try:
            if relay is not None:
                cancel_sub = await listen_for_cancel(self.bus, request.stream_to, flight.cancel_for_caller)
            # wait_for cancels the call at the deadline; a streaming backend closes its stream.
            completion = await asyncio.wait_for(flight.call, timeout_s)
        except asyncio.CancelledError:
            if flight.killed_by is not None:
                # Whatever the provider generated before the stream closed is billed but not reported.
                message = f"cancelled in flight: {killed_message(flight.killed_by)}"
                return _unknown_usage("killed", model, request, ErrorInfo(kind="killed", message=message))
            if flight.cancelled_by_caller and relay is not None:
                message = f"cancelled by the caller after {relay.seq} streamed chunks"
                error = ErrorInfo(kind="cancelled", message=message)
                return _CallEnd("cancelled", relay.counted_usage(model), "counted", error=error)
            raise  # the service itself is stopping
        except TimeoutError:
            error = ErrorInfo(kind="timeout", message=f"cancelled at the deadline after {timeout_s:.3f}s")
            return _unknown_usage("timeout", model, request, error)
        except BackendError as exc:
            error = ErrorInfo(kind=exc.kind, message=exc.message, retryable=exc.retryable)
            if exc.started:
                return _unknown_usage("error", model, request, error)
            return _CallEnd("error", Usage(), error=error)
        except Exception as exc:
            # A backend bug must still leave its one usage row; whether it billed is unknown.
            self.bus.log.exception("backend_failed", model=model.name)
            error = ErrorInfo(kind="provider", message=scrub(f"{type(exc).__name__}: {exc}"))
            return _unknown_usage("error", model, request, error)
        finally:
            self.in_flight.discard(flight)
            # A no-op once the call is done; stops it when something else failed (the cancel subscription).
            flight.call.cancel()
            if cancel_sub is not None:
                await cancel_sub.unsubscribe()
        reported = completion.provider_model
        if self.strict_pinning and reported and reported != request.model:
            # The provider ran, and billed, another model: metered as reported, answer withheld.
            error = ErrorInfo(
                kind="pinning", message=f"strict pinning: asked for {request.model!r}, the provider ran {reported!r}"
            )
            return _CallEnd("error", completion.usage, completion.usage_source, error=error, provider_model=reported)
        return _CallEnd("ok", completion.usage, completion.usage_source, completion=completion, provider_model=reported)

    async def _finish(
        self, request: InferenceRequest, model: ModelSpec | None, ended: _CallEnd, started: float
    ) -> InferenceResult:
        latency_ms = (time.monotonic() - started) * 1000
        cost = model.cost(ended.usage) if model else 0.0
        completion = ended.completion
        provider_model = ended.provider_model
        if provider_model and provider_model != request.model:
            self.bus.log.warning("provider_model_differs", requested=request.model, reported=provider_model)
        tier = model.tier if model else request.tier
        provider = model.provider if model else ""
        event = usage_event(
            request,
            request.call_id,
            service=self.bus.service,
            tier=tier,
            provider=provider,
            model=provider_model or request.model,
            requested_model=request.model,
            usage=ended.usage,
            cost_usd=cost,
            latency_ms=latency_ms,
            outcome=ended.outcome,
            usage_source=ended.usage_source,
            hardware_profile=model.hardware if model else "",
            spilled_from=request.spilled_from,
            ttft_ms=completion.ttft_ms if completion else 0.0,
        )
        if ended.metered:
            await self.bus.publish_usage(event)
        if ended.error:
            self.bus.log.info("call_failed", kind=ended.error.kind, error=ended.error.message)
        return InferenceResult(
            call_id=request.call_id,
            model=request.model,
            provider_model=provider_model,
            tier=tier,
            provider=provider,
            output=completion.output if completion else "",
            tool_calls=completion.tool_calls if completion else None,
            finish_reason=completion.finish_reason if completion else "",
            usage=ended.usage,
            latency_ms=latency_ms,
            cost_usd=cost,
            error=ended.error,
            graded=completion.graded if completion else None,
            ttft_ms=completion.ttft_ms if completion else 0.0,
            spilled_from=request.spilled_from,
        )
