"""A gateway request's one trip through the mesh: the step to the router, its result back.

The router answers every step with an ``InferenceResult`` (an error one when the call was refused,
killed, timed out or failed: already metered by then) or, for a step it could not take at all, a
``Rejection``. Both become a ``GatewayError`` with the status an OpenAI SDK expects
(services/gateway/errors.py); the headers of an error result still name the call and its cost (a
call killed in flight was metered and paid for).

``call_while_connected`` is the non-streamed request's trip: the call is cancelled when its client
goes away first (services/gateway/disconnect.py), which is why it carries an inbox nobody reads.
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
from starlette.types import Receive

from schemas.messages import InferenceResult, StepRequest
from services.gateway import translate
from services.gateway.disconnect import left_first, stop_call
from services.gateway.errors import GatewayError, client_gone, deadline, from_mesh, no_router
from services.runtime.bus import Bus, Rejected, now_ms

# The router answers at the step's deadline itself (a timeout result); past this much more, it is gone.
GRACE_S = 2.0


async def call_router(bus: Bus, step: StepRequest, headers: dict[str, str]) -> InferenceResult:
    """The step's result from the router; GatewayError when there is none, or it is an error."""
    timeout_s = max(0.0, (step.deadline_ms - now_ms()) / 1000) + GRACE_S
    try:
        result = await bus.request(bus.subjects.step_request, step, InferenceResult, timeout_s, headers)
    except Rejected as rejected:
        raise from_mesh(rejected.error) from None
    except nats.errors.NoRespondersError:
        raise no_router("no router answers on the mesh; is it running (`frugalmesh up`)?") from None
    except TimeoutError:
        raise deadline(f"no answer from the mesh within the deadline ({timeout_s:.1f} s)") from None
    except msgspec.DecodeError as exc:
        raise GatewayError(502, f"unreadable answer from the router: {exc}", type="api_error") from None
    if result.error is not None:
        error = from_mesh(result.error)
        error.headers = translate.headers(result, result.call_id, step.task_id)
        raise error
    return result


async def call_while_connected(
    bus: Bus, step: StepRequest, headers: dict[str, str], receive: Receive
) -> InferenceResult:
    """``call_router`` for a non-streamed request; when its client goes away first, the call is
    cancelled (and metered ``cancelled`` by the inference service) and this raises ``client_gone``."""
    inbox = bus.new_inbox()
    answer = asyncio.ensure_future(call_router(bus, msgspec.structs.replace(step, stream_to=inbox), headers))
    try:
        gone = await left_first(answer, receive)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    if gone:
        await stop_call(bus, inbox, answer)
        raise client_gone()
    return answer.result()
