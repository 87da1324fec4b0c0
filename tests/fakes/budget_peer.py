"""A test peer standing in for the accountant's reservation side (plain nats-py, real NATS).

It answers ``mesh.budget.reserve`` with a grant, or a refusal with ``refuse`` as the reason, and
acknowledges ``mesh.budget.settle``; it keeps what it saw so a test can check what the router
reserved and settled. The budget rules themselves are the accountant's and tested there.
"""

from __future__ import annotations

import msgspec

from schemas.messages import Reservation, ReservationDecision
from schemas.subjects import Subjects


class BudgetPeer:
    def __init__(self, nc, subjects: Subjects, *, refuse: str | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.refuse = refuse
        self.reserved: list[Reservation] = []
        self.settled: list[Reservation] = []

    async def start(self) -> BudgetPeer:
        await self.nc.subscribe(self.subjects.budget_reserve, cb=self._reserve)
        await self.nc.subscribe(self.subjects.budget_settle, cb=self._settle)
        await self.nc.flush()
        return self

    async def _reserve(self, msg) -> None:
        reservation = msgspec.json.decode(msg.data, type=Reservation)
        self.reserved.append(reservation)
        decision = ReservationDecision(id=reservation.id, granted=self.refuse is None, reason=self.refuse or "")
        await msg.respond(msgspec.json.encode(decision))

    async def _settle(self, msg) -> None:
        reservation = msgspec.json.decode(msg.data, type=Reservation)
        self.settled.append(reservation)
        await msg.respond(msgspec.json.encode(ReservationDecision(id=reservation.id, granted=True)))
