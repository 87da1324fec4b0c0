"""The accountant's writes to the control bucket: the kill switches it trips and the pace signals it
sends, one at a time in the order decided.

A trip is written until it lands, then recorded as landed (``TripWritten`` in the journal, through
``landed``). A trip decided and journaled whose switch never landed (the control bucket unwritable
for a while, or the accountant dead before the write got through) stays in the ledger's
``trips_unwritten``, and the next term writes it again (``Accounts.start``): a crossed cap always
ends in a tripped switch, also across restarts and failovers. A trip that landed is never written
again, so an operator's ``frugalmesh clear`` after it stands. One edge is left: a trip that lands
while a graceful stop is draining the queue, after the journal closed, is written once more by the
next term.

A pace signal is tried ``PACE_TRIES`` times: the next pacing round sends a fresh one if it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from schemas.messages import KillSwitch, PaceSignal
from services.accountant.ledger import Bucket
from services.runtime.bus import Bus
from services.runtime.control import set_kill, set_pace

PACE_TRIES = 5
# Between tries of a failed write: doubling from the first, at most the last.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class TripWrite:
    """The switch the crossing of ``bucket`` trips."""

    bucket: Bucket
    switch: KillSwitch


class ControlWriter:
    def __init__(self, bus: Bus, landed: Callable[[Bucket], None]) -> None:
        self.bus = bus
        self.landed = landed
        self._queue: asyncio.Queue[TripWrite | PaceSignal] = asyncio.Queue()

    def put(self, item: TripWrite | PaceSignal) -> None:
        self._queue.put_nowait(item)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for what is queued to be written."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def run_forever(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, TripWrite):
                    await self._write(item.switch, tries=None)
                    self.landed(item.bucket)
                else:
                    await self._write(item, tries=PACE_TRIES)
            finally:
                self._queue.task_done()

    async def _write(self, item: KillSwitch | PaceSignal, tries: int | None) -> None:
        """Write ``item``, tried ``tries`` times (None: until it lands)."""
        attempt = 0
        while True:
            try:
                if isinstance(item, KillSwitch):
                    await set_kill(self.bus, item)
                else:
                    await set_pace(self.bus, item)
                return
            except Exception as exc:
                self.bus.log.error("control_write_failed", item=str(item), attempt=attempt, error=str(exc))
                attempt += 1
                if tries is not None and attempt >= tries:
                    return
                await asyncio.sleep(min(RETRY_FIRST_S * 2**attempt, RETRY_MAX_S))
