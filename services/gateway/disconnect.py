"""A request whose HTTP client goes away stops its call: the disconnect is heard without polling, and
the call is cancelled the way a dropped stream's is.

Heard: once a request's body has been read, the only message an ASGI server's ``receive`` still has
for it is ``http.disconnect`` (uvicorn sends it when the connection is lost, or once the response has
been sent). So a call is awaited together with one task parked in ``receive`` (``left_first``):
no timer and no poll, one extra task per request that wakes only when the client leaves or the
answer comes. Starlette does the same for a stream once its body runs (``StreamingResponse``
listens for the disconnect and cancels the body, services/gateway/streaming.py); this covers the
two cases it does not: a streamed call before its first token (its response has not begun) and a
non-streamed call (its response is one body, sent at the end).

Cancelled: a message on the call's ``<inbox>.cancel`` makes the inference service stop the backend
call, so the engine stops generating, and meter the call once, ``cancelled``, with what it produced
(services/inference/streaming.py). A non-streamed call therefore carries an inbox as well
(``stream_to``), which nobody reads: the NATS server drops its chunks. A cancel sent while the call
is still at the router (the cache, the reservation, a throttle's wait) reaches nobody, so after a
disconnect the gateway listens on the inbox until the call's answer and sends the cancel again at
each chunk that still arrives (``stop_call``): a call that starts after all stops at its first piece
of output. A backend that does not stream runs to its end and is metered as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from starlette.types import Receive

from schemas.subjects import Subjects
from services.runtime.bus import Bus


async def disconnected(receive: Receive) -> None:
    """Returns once the client has gone (or the response was sent: the server says so the same way)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive that fails is a connection that is gone
        return


async def left_first(work: asyncio.Future[Any], receive: Receive) -> bool:
    """Wait until ``work`` is done or its client has gone: True when the client went first (``work``
    is left running, for ``stop_call``)."""
    if work.done():
        return False
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return not work.done()


async def stop_call(bus: Bus, inbox: str, answer: asyncio.Future[Any] | None) -> None:
    """Cancel the call that streams to ``inbox``, and again at each chunk it still publishes there,
    until ``answer`` (the router's reply: the call has ended and is metered) is done."""
    cancel = Subjects.stream_cancel(inbox)

    async def again(_: Msg) -> None:
        await bus.publish_core(cancel, b"")

    # Subscribed before the first cancel, so no chunk between the two goes unanswered.
    sub = await bus.subscribe_core(inbox, again)
    try:
        await bus.publish_core(cancel, b"")
        if answer is not None:
            await asyncio.wait((answer,))
            if not answer.cancelled():
                answer.exception()  # how the call ended (cancelled, most likely) is no news to a client that left
    finally:
        # At shutdown the connection may be closed already; the call's deadline still ends it.
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
