"""A streamed step under the cascade policy: the weak call runs unstreamed, only an escalation streams.

The cascade may reject the weak model's answer and ask the strong model again, and text already
streamed to a caller cannot be taken back: streaming both calls would show the caller the rejected
answer followed by the accepted one. So the weak call is sent without ``stream_to`` (an accepted
answer reaches the caller whole, in the result: a caller that got no chunks shows the result's
text) and only the strong call streams.

While the weak call runs no inference service listens for the caller's cancel, so the router does:
a cancel heard by then keeps the strong call from being sent (nothing is sent, so there is no usage
row, as for a call whose deadline passed). The weak call, the cheap one, runs to its end and is
metered as usual; the strong call, once sent, is cancelled by the inference service itself.
"""

from __future__ import annotations

import uuid

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.messages import ErrorInfo, InferenceResult, StepRequest
from services.runtime.bus import Bus
from services.runtime.catalog import ModelSpec


class CascadeStream:
    def __init__(self, step: StepRequest) -> None:
        self.step = step
        self.calls = 0
        self.cancelled = False
        self._subscription: Subscription | None = None

    async def open(self, bus: Bus) -> None:
        self._subscription = await bus.subscribe_core(bus.subjects.stream_cancel(self.step.stream_to), self._cancel)

    async def _cancel(self, _: Msg) -> None:
        self.cancelled = True

    def next_step(self) -> StepRequest | None:
        """The step the next call is sent as (the first without ``stream_to``); None once cancelled."""
        if self.cancelled:
            return None
        self.calls += 1
        return msgspec.structs.replace(self.step, stream_to="") if self.calls == 1 else self.step

    @staticmethod
    def cancelled_call(model: ModelSpec) -> InferenceResult:
        """The result of the call not sent because the caller had gone."""
        return InferenceResult(
            call_id=uuid.uuid4().hex,
            model=model.name,
            tier=model.tier,
            provider=model.provider,
            error=ErrorInfo(kind="cancelled", message="the caller cancelled the stream before this call was sent"),
        )

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
