"""Operators' changes: cap changes and kill switches, served by the accountant alone, each recorded with who and when.

An operator asks on ``<prefix>.operator.<name>.budget`` (a ``BudgetUpdate``) or
``<prefix>.operator.<name>.kill`` (a ``KillSwitch``, tripped or cleared). Only the credential of
operator ``<name>`` may publish there (services/runtime/identities.py), so the name in the subject
is who asked: the accountant writes it into the change's ``by``, whatever the body said, stamps the
time, applies the change (the budgets bucket, or the control bucket every service watches: the
operator is told it failed only when that failed) and publishes the event of record
(``<prefix>.control.budget`` / ``.kill``, JetStream), which ingest stores in ClickHouse
(``budget_changes``, ``kill_events``).

Only the accountant writes those buckets, so a switch needs a running accountant. Without one no
paid call is reserved either (the reservation client fails closed), so a trip that cannot reach
the control bucket has nothing left to stop but calls already running, which end at their deadline.
Served in the leader's term only, like reservations: the leader's budget book is the one in force.
"""

from __future__ import annotations

import contextlib

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import Error as JetStreamError

from schemas.messages import BudgetUpdate, KillSwitch
from schemas.subjects import OPERATOR_BUDGET, OPERATOR_KILL, STREAM_CONTROL, Subjects
from services.accountant.reservations import Accounts
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.control import write_kill

QUEUE = "accountant"


class OperatorChanges:
    def __init__(self, bus: Bus, accounts: Accounts) -> None:
        self.bus = bus
        self.accounts = accounts
        self._subs: list[Subscription] = []

    async def subscribe(self) -> None:
        subjects = self.bus.subjects
        self._subs = [
            await self.bus.subscribe_core(subjects.operator_all(OPERATOR_BUDGET), self._budget, queue=QUEUE),
            await self.bus.subscribe_core(subjects.operator_all(OPERATOR_KILL), self._kill, queue=QUEUE),
        ]

    async def unsubscribe(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _budget(self, msg: Msg) -> None:
        update = await self.bus.decode(msg, BudgetUpdate)
        if update is None:
            await msg.respond(self.bus.rejection("not a BudgetUpdate (dead-lettered with the decode error)"))
            return
        update = msgspec.structs.replace(update, by=Subjects.operator_of(msg.subject), time_ms=now_ms())
        state = await self.accounts.update(update)
        if not state.error:
            await self._record(self.bus.subjects.control_budget, update)
        await msg.respond(encode(state))

    async def _kill(self, msg: Msg) -> None:
        switch = await self.bus.decode(msg, KillSwitch)
        if switch is None:
            await msg.respond(self.bus.rejection("not a KillSwitch (dead-lettered with the decode error)"))
            return
        switch = msgspec.structs.replace(switch, by=Subjects.operator_of(msg.subject), time_ms=now_ms())
        try:
            await write_kill(self.bus, switch)
        except (JetStreamError, TimeoutError) as exc:
            self.bus.log.error("operator_switch_not_written", scope=switch.scope, key=switch.key, error=str(exc))
            await msg.respond(self.bus.rejection(f"the switch was not written: {exc}", kind="unavailable"))
            return
        await self._record(self.bus.subjects.control_kill, switch)
        self.bus.log.warning(
            "operator_switch", scope=switch.scope, key=switch.key, tripped=switch.tripped, by=switch.by
        )
        await msg.respond(encode(switch))

    async def _record(self, subject: str, change: msgspec.Struct) -> None:
        """The event of record; a change applied but not recorded is logged (it still holds)."""
        try:
            await self.bus.publish(subject, change, stream=self.bus.subjects.stream(STREAM_CONTROL))
        except (JetStreamError, TimeoutError) as exc:
            self.bus.log.error("operator_change_not_recorded", subject=subject, error=str(exc))
