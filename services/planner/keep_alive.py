"""Keeps the planner's running tasks from being redelivered: one sweep a second marks every task
that has run for a third of ``ack_wait`` since its last mark ``in_progress``.

Why one sweep and not a timer per task: with thousands of long tasks in flight, a timer per task
wakes the event loop once per task per mark and sends each mark in its own flush (a write on the
planner's socket, a read on nats-server's), which made the marks most of the CPU of a 40 s call at
5,000 in flight (docs/benchmarks.md, "Calls in flight and the lean task path"). A sweep publishes
the marks that are due together, so nats-py writes them in one flush and the server reads them at
once; sweeping every second spreads them over the third of ``ack_wait`` instead of bunching them.

Sweeps come every ``SWEEP_S``, or every sixth of ``ack_wait`` when that is shorter (tests use an
``ack_wait`` under a second), so a task is marked at most half an ``ack_wait`` after its last mark:
a live task is never redelivered; a dead replica's marks stop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.aio.msg import Msg

from services.runtime.bus import Bus

SWEEP_S = 1.0


class KeepAlive:
    def __init__(self, bus: Bus, ack_wait_s: float) -> None:
        self.bus = bus
        self.mark_every_s = ack_wait_s / 3
        self.sweep_every_s = min(SWEEP_S, ack_wait_s / 6)
        # Each running task's message (by its ack subject, one per delivery) and when it was last
        # marked (or started), in monotonic seconds.
        self._marked: dict[str, tuple[Msg, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def hold(self, msg: Msg) -> None:
        """``msg``'s task is running here: keep marking it until ``release``."""
        self._marked[msg.reply] = (msg, time.monotonic())

    def release(self, msg: Msg) -> None:
        self._marked.pop(msg.reply, None)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_every_s)
            try:
                await self.sweep()
            except Exception:
                # A mark that cannot be sent now (a reconnect) is sent at the next sweep.
                self.bus.log.warning("keep_alive_failed", exc_info=True)

    async def sweep(self) -> None:
        now = time.monotonic()
        due = [msg for msg, marked in self._marked.values() if now - marked >= self.mark_every_s]
        for msg in due:
            await msg.in_progress()  # buffered: the sweep's marks go out in one flush
            if msg.reply in self._marked:
                self._marked[msg.reply] = (msg, now)
