"""A test peer standing in for the router (plain nats-py, real NATS), for planner tests.

It subscribes to ``step_request`` and replies InferenceResult JSON, so each test decides what the
"model" answers, how slowly, or how it fails; it keeps what it was asked and how many calls it
had in flight at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import msgspec

from schemas.messages import InferenceResult, StepRequest

# What the test peer answers: an InferenceResult, raw bytes (e.g. a rejection), or None (never reply).
Responder = Callable[[StepRequest], InferenceResult | bytes | None]


def result(request: StepRequest, output: str, cost_usd: float = 0.001, **fields) -> InferenceResult:
    """The answer of a local model to ``request``, a fresh call id each time."""
    return InferenceResult(
        call_id=f"{request.step_id}-{request.attempt}-{uuid.uuid4().hex[:6]}",
        model="mixtral-8x7b-local",
        tier="local",
        output=output,
        cost_usd=cost_usd,
        **fields,
    )


class RouterTestPeer:
    """Test peer standing in for the router on ``step_request``; records what it was asked."""

    def __init__(self, nc, subject: str, respond: Responder, delay_s: float = 0.0) -> None:
        self.nc = nc
        self.subject = subject
        self.respond = respond
        self.delay_s = delay_s
        self.requests: list[StepRequest] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> RouterTestPeer:
        self.sub = await self.nc.subscribe(self.subject, cb=self._on_request)
        # Twice: nats-py 2.16's flush PING can overtake a SUB still in its pending buffer.
        await self.nc.flush()
        await self.nc.flush()
        return self

    async def _on_request(self, msg) -> None:
        # nats-py runs a subscription's callback one message at a time: answer each concurrently.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg) -> None:
        request = msgspec.json.decode(msg.data, type=StepRequest)
        self.requests.append(request)
        self.headers.append(dict(msg.headers or {}))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # The model's latency: the behaviour under test is what the planner does meanwhile.
            await asyncio.sleep(self.delay_s)
            reply = self.respond(request)
        finally:
            self.in_flight -= 1
        if reply is not None:
            await msg.respond(reply if isinstance(reply, bytes) else msgspec.json.encode(reply))

    async def stop(self) -> None:
        await self.sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
