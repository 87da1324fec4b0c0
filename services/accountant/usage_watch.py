"""What the usage stream says the calls the ledger holds really cost: how a hold that expires unsettled
is reconciled.

A router that crashes or times out between its call and its settle leaves a hold nobody settles,
while the inference service has run the call and metered it (``UsageEvent`` on
``mesh.usage.<tenant>``, ``event_id`` = ``call_id`` = the reservation id). When such a hold expires
the accountant charges the call's metered cost when the usage stream has it, else the hold's worst
case (``Accounts.expire_due``): unknown usage is never zero, so no crash lets spend escape a cap. A
hold is never released uncharged unless its grant was withdrawn before anyone saw it.

Decision: the leader reads the usage stream itself, for its term, with an ordered consumer
(``UsageWatch``), and keeps the cost of each event whose call it holds (so no more than one entry per
hold, dropped when the hold ends). Rejected: a lookup per expiry. The stream is keyed by tenant, not
by call, so finding one call means reading the tenant's events since the grant, once per expiring
hold: a router that dies with a thousand calls in flight would cost a thousand scans at once.
ClickHouse's ``usage_events`` has the call id, but ingest lags a batch and ClickHouse may be away
while budgets must go on. The watch costs the leader one decode of a few fields per call.

Where it starts: at the earliest grant of the holds the term restored (their usage events may have
come while no accountant led), never later than now, less ``CLOCK_SKEW_MS`` (the grant's time is the
accountant's clock, the stream's the server's). A hold restored from a snapshot written before holds
kept their grant's time is read back from ``UNKNOWN_GRANT_LOOKBACK_MS`` before its expiry. Holds
expire only once the watch has read what the stream held when it started (``ready``), or after
``CATCH_UP_S`` in any case: a watch that cannot read falls back on the worst case.

A usage event counts only for a hold of its own tenant. One that comes after its hold expired changes
nothing: the charge stands (reconciliation is final, as a settle is), and a later settle of that call
is answered "already settled" without counting it again. Not done: correcting a worst-case charge
downwards when the usage event comes late.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from schemas.subjects import STREAM_USAGE
from services.accountant.ledger import Hold, pico
from services.runtime.bus import Bus, now_ms

CLOCK_SKEW_MS = 5_000
UNKNOWN_GRANT_LOOKBACK_MS = 3_600_000
CATCH_UP_S = 10.0


class _Metered(msgspec.Struct):
    """The fields of a ``UsageEvent`` reconciliation reads (the others are skipped undecoded)."""

    event_id: str
    tenant: str
    call_id: str = ""
    cost_usd: float = 0.0


_decode = msgspec.json.Decoder(_Metered).decode


def read_from_ms(holds: Mapping[str, Hold]) -> int:
    """Where a term's watch starts reading: see the module docstring."""
    starts = [h.time_ms or h.reservation.expires_ms - UNKNOWN_GRANT_LOOKBACK_MS for h in holds.values()]
    return min([*starts, now_ms()]) - CLOCK_SKEW_MS


class UsageWatch:
    """The metered cost of each held call whose usage event the stream has delivered, for one term."""

    def __init__(self, bus: Bus, holds: Mapping[str, Hold]) -> None:
        self.bus = bus
        self.holds = holds
        self.costs: dict[str, int] = {}
        self._caught_up = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self, since_ms: int) -> None:
        subjects = self.bus.subjects
        self._sub = await self.bus.jetstream.subscribe(
            subjects.usage_all,
            stream=subjects.stream(STREAM_USAGE),
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.fromtimestamp(max(since_ms, 0) / 1000, tz=UTC),
            ),
            cb=self._on_usage,
        )
        # Nothing to read and nothing delivered yet: caught up now. Else the message with nothing after
        # it says so once its cost is kept (a message delivered is not yet read by ``_on_usage``).
        with contextlib.suppress(Exception):
            info = await self._sub.consumer_info()
            if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0):
                self._caught_up.set()

    async def ready(self) -> None:
        """Return once the watch has read the backlog it started with, or after ``CATCH_UP_S``."""
        try:
            await asyncio.wait_for(self._caught_up.wait(), CATCH_UP_S)
        except TimeoutError:
            self.bus.log.warning("usage_watch_behind", after_s=CATCH_UP_S)

    async def _on_usage(self, msg: Msg) -> None:
        try:
            event = _decode(msg.data)
            call = event.call_id or event.event_id
            hold = self.holds.get(call)
            if hold is not None and hold.reservation.tenant == event.tenant:
                self.costs[call] = pico(event.cost_usd)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            # Ingest dead-letters it (ingest.py); here it is only a cost not learnt, so the worst case.
            self.bus.log.warning("usage_unreadable_for_reconciliation", error=str(exc))
        if msg.metadata.num_pending == 0:
            self._caught_up.set()

    def take(self, reservation_id: str) -> int | None:
        """The metered cost of a call whose hold ends now, if the stream has it (forgotten either way)."""
        return self.costs.pop(reservation_id, None)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self.costs.clear()
