"""The caller's side of reserve-before-spend: reserve a paid call's worst case with the accountant
(``mesh.budget.reserve``) before it starts, settle its actual cost (``mesh.budget.settle``) after.

The client fails closed: an accountant that does not answer is a refusal, because a call started
without a reservation could be the one that crosses a cap nobody was checking. Before that, an
unanswered request (no replica serving budgets, or the leader died holding it) is sent again, with
the same reservation id, for up to ``FAILOVER_S``: the time a standby accountant takes to take over
(services/accountant/lease.py); so is a reserve the accountant refused only because it could not store
its ledger at that moment (a grant is stored before it is answered). A repeat is harmless: the
accountant answers a reservation id it already decided with the same decision, and counts a settle once.

A granted decision carries the accountant's signed grant (``ReservationDecision.grant``,
services/runtime/grants.py); the caller passes it on, unread, in ``InferenceRequest.grant``, and the
inference service runs the paid call only if it verifies.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgspec
import nats.errors

from schemas.messages import Reservation, ReservationDecision
from schemas.subjects import HEADER_BUDGET
from services.runtime.bus import Bus
from services.runtime.catalog import ModelSpec
from services.runtime.stored import ELECTION_RETRY_S

# The task's own cap (Task.budget_usd) in USD, a decimal string, set by the planner on each
# StepRequest; the router copies it into Reservation.task_budget_usd. Absent: no task cap.

UNAVAILABLE = "budget service unavailable"
# A reservation is one in-memory decision at the accountant; when it takes longer than this, the
# accountant is down or drowning, and a call should not sit on its deadline waiting for it.
DEFAULT_TIMEOUT_S = 2.0
# How long an unanswered reserve or settle is sent again: a standby's takeover (lease.py's lease and poll,
# plus rebuilding the ledger) with room to spare.
FAILOVER_S = 5.0
# Between tries while no accountant is subscribed ("no responders" comes back at once).
RETRY_INTERVAL_S = 0.1


def is_paid(model: ModelSpec) -> bool:
    """Whether a call on ``model`` spends money, and so needs a reservation and obeys the kill switch."""
    return model.input_usd_per_mtok > 0 or model.output_usd_per_mtok > 0


def parse_budget(value: str | None) -> float | None:
    """The task budget carried in ``Mesh-Budget``; ValueError for anything but a finite amount >= 0."""
    if value is None:
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = math.nan
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"{HEADER_BUDGET} must be a finite amount of USD >= 0, not {value!r}")
    return budget


class ReservationClient:
    def __init__(self, bus: Bus, timeout_s: float = DEFAULT_TIMEOUT_S, failover_s: float = FAILOVER_S) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self.failover_s = failover_s

    async def _ask(self, subject: str, reservation: Reservation, time_left_s: float) -> ReservationDecision:
        """The accountant's reply, sent again while unanswered, within ``time_left_s`` and ``failover_s``;
        raises the last NoRespondersError / TimeoutError when there is none."""
        give_up = time.monotonic() + min(time_left_s, self.failover_s)
        while True:
            left = give_up - time.monotonic()
            try:
                return await self.bus.request(
                    subject, reservation, ReservationDecision, max(min(self.timeout_s, left), 0.001)
                )
            except nats.errors.NoRespondersError:
                if left <= RETRY_INTERVAL_S:
                    raise
                await asyncio.sleep(RETRY_INTERVAL_S)
            except TimeoutError:
                if give_up - time.monotonic() <= 0:
                    raise

    async def reserve(self, reservation: Reservation, time_left_s: float) -> ReservationDecision:
        """The accountant's decision; a refusal when it cannot be had within the call's time. A refusal
        because the accountant cannot store its ledger just now (JetStream refusing writes, as while a
        cluster elects a leader) is asked again too, like no answer, within the same window."""
        subject = self.bus.subjects.budget_reserve
        give_up = time.monotonic() + min(max(time_left_s, 0.001), self.failover_s)
        try:
            while True:
                decision = await self._ask(subject, reservation, max(give_up - time.monotonic(), 0.001))
                retry = not decision.granted and decision.reason.startswith(UNAVAILABLE)
                if not retry or time.monotonic() + ELECTION_RETRY_S >= give_up:
                    return decision
                await asyncio.sleep(ELECTION_RETRY_S)
        except (nats.errors.NoRespondersError, TimeoutError) as exc:
            # Fail closed (see the module docstring): no answer is no.
            self.bus.log.warning("reservation_unanswered", reservation_id=reservation.id, error=type(exc).__name__)
            return ReservationDecision(id=reservation.id, granted=False, reason=UNAVAILABLE)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.bus.log.error("reservation_reply_unreadable", reservation_id=reservation.id, error=str(exc))
            return ReservationDecision(id=reservation.id, granted=False, reason=f"{UNAVAILABLE}: unreadable reply")

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the reservation's hold by what the call really cost.

        A settle that is lost lets no spend escape: the usage event is the record of spend, and the
        unsettled hold is charged the cost it meters (or its worst case) at the call's deadline
        (services/accountant/usage_watch.py). So a failure here is logged, not raised.
        """
        settled = msgspec.structs.replace(reservation, actual_usd=actual_usd)
        try:
            # Bus.request (nats-py's), as for the reserve: FastStream's costs more than the round trip.
            decision = await self._ask(self.bus.subjects.budget_settle, settled, self.failover_s)
        except (nats.errors.NoRespondersError, TimeoutError) as exc:
            self.bus.log.warning("settle_unanswered", reservation_id=reservation.id, error=type(exc).__name__)
            self.bus.outbox.settle_later(settled)  # sent until an accountant answers (outbox.py)
            return
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.bus.log.error("settle_reply_unreadable", reservation_id=reservation.id, error=str(exc))
            return
        if not decision.granted:
            self.bus.log.warning("settle_refused", reservation_id=reservation.id, reason=decision.reason)
