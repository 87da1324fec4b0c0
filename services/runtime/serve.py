"""Request/reply on a queue group where a request waiting on a model costs a coroutine, not a worker.

A model call takes seconds to minutes, and nearly all of it is waiting. A server that holds a worker
slot per request carries at most ``slots / call time`` requests a second, however idle its CPU
(64 slots and 2.3 s calls: 28 a second, the queue issue 15 measured). ``RequestServer`` gives each
request its own asyncio task, so what bounds a replica is its memory and the CPU its requests
really use: ``capacity`` requests in flight at once.

Back-pressure, explicitly: a core NATS queue group keeps delivering to a member however busy it is,
so a full replica leaves the group instead. Once ``capacity`` requests are in flight it drains its
subscription (the server stops routing to it; what was already sent to it is still served) and
subscribes again once it is back under ``resume_at``. NATS then spreads new requests over the
replicas that have room, and when none has, a requester gets "no responders" at once, which the
mesh's callers treat as a retryable ``unavailable``, rather than a request waiting unseen in a full
replica's client buffer for a time-out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from services.runtime.bus import Bus

# What a handler may raise that the same request may not meet again: the bus or JetStream not
# answering (a cluster electing a leader, a server restarting). Its rejection says retryable.
TRANSIENT = (TimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError)

Handler = Callable[[Msg], Awaitable[bytes | None]]
# Requests one replica holds by default: about 20 KB each (a coroutine, its request and reply
# buffers), so tens of MB at most; the benchmark loadtest/bench/inflight.py measures it.
DEFAULT_CAPACITY = 10_000
# Rejoin the queue group when this share of capacity is free again: not at the first free slot, so
# a replica at its limit does not leave and rejoin for every request.
RESUME_SHARE = 0.9


class RequestServer:
    """Serves ``subject`` in queue group ``queue``: ``handle`` answers each request (its reply bytes,
    or None to send none), each in its own task, at most ``capacity`` at once (``start`` it once
    connected, ``stop`` it before closing)."""

    def __init__(self, bus: Bus, subject: str, queue: str, handle: Handler, *, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.bus = bus
        self.subject = subject
        self.queue = queue
        self.handle = handle
        self.capacity = capacity
        self.resume_at = max(0, int(capacity * RESUME_SHARE) - 1)
        self.in_flight = 0
        # How often this replica left its queue group because it was full (for the benchmark and tests).
        self.times_full = 0
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._membership: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subscription = await self._subscribe()
        self._membership = asyncio.create_task(self._keep_membership())

    async def stop(self) -> None:
        """Stop taking requests and cancel those in flight (their callers see the deadline or no reply)."""
        if self._membership is not None:
            self._membership.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._membership
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def joined(self) -> bool:
        """Whether this replica is in its queue group (not full) now."""
        return self._subscription is not None

    async def _subscribe(self) -> Subscription:
        return await self.bus.subscribe_core(self.subject, self._on_request, queue=self.queue)

    async def _on_request(self, msg: Msg) -> None:
        # nats-py calls this one message at a time: hand the request over and return at once.
        self.in_flight += 1
        if self.in_flight >= self.capacity:
            self._room.clear()
            self._full.set()
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def _serve(self, msg: Msg) -> None:
        try:
            reply = await self.handle(msg)
        except Exception as exc:  # a bug must cost one request, never the server
            self.bus.log.exception("request_failed", subject=msg.subject)
            reason = f"{self.bus.service} failed on this request: {exc!r}"
            reply = self.bus.rejection(reason, "unavailable", retryable=isinstance(exc, TRANSIENT))
        if reply is not None and msg.reply:
            await msg.respond(reply)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.in_flight -= 1
        if self.in_flight <= self.resume_at:
            self._full.clear()
            self._room.set()

    async def _keep_membership(self) -> None:
        """Leave the queue group while full, rejoin once there is room (see the module docstring)."""
        while True:
            await self._full.wait()
            subscription, self._subscription = self._subscription, None
            self.times_full += 1
            self.bus.log.warning("full_left_queue_group", subject=self.subject, in_flight=self.in_flight)
            if subscription is not None:
                # Drained, not dropped: requests the server already sent here are still served.
                await subscription.drain()  # type: ignore[no-untyped-call]
            await self._room.wait()
            self._subscription = await self._subscribe()
            self.bus.log.info("rejoined_queue_group", subject=self.subject, in_flight=self.in_flight)
