"""A test peer standing in for the accountant's reservation side (plain nats-py, real NATS).

It answers ``mesh.budget.reserve`` with a grant (signed as the accountant signs it, with the key
the test's inference services verify: fakes/grants.py), or a refusal with ``refuse`` as the reason,
and acknowledges ``mesh.budget.settle``; it keeps what it saw so a test can check what the router
reserved and settled. The budget rules themselves are the accountant's and tested there.
"""

from __future__ import annotations

import msgspec

from fakes.grants import local_signer
from schemas.messages import Reservation, ReservationDecision
from schemas.subjects import Subjects
from services.runtime.grants import GrantSigner


class BudgetPeer:
    def __init__(self, nc, subjects: Subjects, *, refuse: str | None = None, signer: GrantSigner | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.refuse = refuse
        self.signer = signer or local_signer()
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
        if self.refuse is None:
            decision = ReservationDecision(id=reservation.id, granted=True, grant=self.signer.grant(reservation))
        else:
            decision = ReservationDecision(id=reservation.id, granted=False, reason=self.refuse)
        await msg.respond(msgspec.json.encode(decision))

    async def _settle(self, msg) -> None:
        reservation = msgspec.json.decode(msg.data, type=Reservation)
        self.settled.append(reservation)
        await msg.respond(msgspec.json.encode(ReservationDecision(id=reservation.id, granted=True)))
