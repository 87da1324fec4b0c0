"""The accountant: budgets, reservations, the kill-switch authority, pacing, and ClickHouse ingest.

Budgets (``reservations.py``): reserve and settle requests against the caps of
``deploy/budgets.toml`` and their run-time changes (an operator's, ``operators.py``; ``mesh.budget.show``);
a cap crossed trips the kill switch of its scope; tenants are paced against their month curve.
A granted reservation is answered with its grant, signed with the accountant's grant key
(services/runtime/grants.py: ``FRUGALMESH_GRANT_SEED``, ``FRUGALMESH_GRANT_SEED_FILE`` or
``<home>/grant.seed``), which the inference services verify before a paid call.
Reserve, settle, operators' changes and budget queries are served by ``ReservationServer`` on plain
subscriptions, by one replica at a time: the one holding the lease (``lease.py``), which
subscribes when its term starts (the ledger rebuilt) and unsubscribes when it ends.

Ingest (``ingest.py``): usage events, terminal task events, artifacts and kill-switch events each
have their own durable pull consumer (shared by every accountant replica), fetched in real
batches (``Bus.pull``), so one batch is one INSERT; see ``ingest.py`` for the exactly-once rules.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from faststream import FastStream
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig

from schemas.messages import BudgetQuery, Reservation, ReservationDecision
from schemas.subjects import (
    DURABLE_ARTIFACT_INGEST,
    DURABLE_BUDGET_INGEST,
    DURABLE_FEEDBACK_INGEST,
    DURABLE_KILL_INGEST,
    DURABLE_TASK_INGEST,
    DURABLE_USAGE_INGEST,
    STREAM_ARTIFACT_EVENTS,
    STREAM_CONTROL,
    STREAM_FEEDBACK,
    STREAM_TASK_EVENTS,
    STREAM_USAGE,
)
from services.accountant.alert_rules import ALERTS_FILE, AlertConfig
from services.accountant.alerts import Alerts
from services.accountant.budget import BUDGETS_FILE, BudgetConfig
from services.accountant.ingest import BatchConsumer, Ingest, Store
from services.accountant.journal import Commit
from services.accountant.lease import LEASE_S, Leadership
from services.accountant.operators import OperatorChanges
from services.accountant.reservations import Accounts, MsClock
from services.accountant.rows import ARTIFACTS, BUDGET_CHANGES, FEEDBACK, KILLS, TASKS, USAGE, Sink
from services.runtime.bus import Bus, encode, now_ms
from services.runtime.dead_letters import UNREADABLE
from services.runtime.grants import GrantSigner, load_signer
from services.runtime.settings import MeshSettings

SERVICE = "accountant"
QUEUE = "accountant"


class ReservationServer:
    """Serves reserve and settle requests, on plain subscriptions (``Bus.subscribe_core``).

    Every paid call makes these two requests, so they skip FastStream: its per-message work
    (dependency resolution, context, thread hops for sync steps) costs several times a
    reservation's own decision (docs/benchmarks.md, "Reservation round trip"). The handler decides
    synchronously and parks the reply on the journal commit its decision joined; the journal's
    acknowledgement callback then sends all of that commit's replies itself. So the subscription
    never waits on a journal write, many decisions share one (group commit), and a stored grant is
    answered without another trip through the event loop.
    """

    def __init__(self, bus: Bus, accounts: Accounts) -> None:
        self.bus = bus
        self.accounts = accounts
        self._subs: list[Subscription] = []
        self._parked: dict[Commit, list[tuple[str, Reservation, ReservationDecision, DecisionReply]]] = {}

    async def subscribe(self) -> None:
        subjects = self.bus.subjects
        self._subs = [
            await self.bus.subscribe_core(subjects.budget_reserve, self._reserve, queue=QUEUE),
            await self.bus.subscribe_core(subjects.budget_settle, self._settle, queue=QUEUE),
            await self.bus.subscribe_core(subjects.budget_show, self._show_budget, queue=QUEUE),
        ]

    async def unsubscribe(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _reserve(self, msg: Msg) -> None:
        r = await self._decode(msg)
        if r is not None:
            decision, stored = self.accounts.decide_reserve(r)
            await self._reply(msg, r, decision, stored, self.accounts.reserve_reply)

    async def _settle(self, msg: Msg) -> None:
        r = await self._decode(msg)
        if r is not None:
            decision, stored = self.accounts.decide_settle(r)
            await self._reply(msg, r, decision, stored, self.accounts.settle_reply)

    async def _show_budget(self, msg: Msg) -> None:
        query = await self.bus.decode(msg, BudgetQuery)
        if query is None:
            await msg.respond(self.bus.rejection("not a BudgetQuery (dead-lettered with the decode error)"))
        else:
            await msg.respond(encode(self.accounts.show(query)))

    async def _decode(self, msg: Msg) -> Reservation | None:
        try:
            return _decode_reservation(msg.data)
        except UNREADABLE as exc:
            await self.bus.dead_letter(msg.subject, msg.data, msg.headers, f"Reservation: {exc}")
            await msg.respond(self.bus.rejection("not a Reservation (dead-lettered with the decode error)"))
            return None

    async def _reply(
        self, msg: Msg, r: Reservation, decision: ReservationDecision, stored: Commit | None, reply_for: DecisionReply
    ) -> None:
        if stored is None:  # nothing to wait for (a refusal, a settle of a live hold): answer at once
            await msg.respond(encode(decision))
            return
        parked = self._parked.get(stored)
        if parked is None:
            parked = self._parked[stored] = []
            stored.on_stored(self._send)
        parked.append((msg.reply, r, decision, reply_for))

    async def _send(self, stored: Commit, error: BaseException | None) -> None:
        """Answer everyone parked on ``stored`` (run by the journal once it is stored or failed)."""
        publish = self.bus.publish_core
        for to, r, decision, reply_for in self._parked.pop(stored):
            data = encode(reply_for(r, decision, error))
            if to:  # a request sent without a reply subject waits for nothing
                await publish(to, data)


_decode_reservation = msgspec.json.Decoder(Reservation).decode
# How a decision becomes the reply once its journal write finished (with the error, if any).
DecisionReply = Callable[[Reservation, ReservationDecision, BaseException | None], ReservationDecision]


def create_app(
    settings: MeshSettings,
    *,
    database: str | None = None,
    batch_size: int = 5000,
    batch_timeout_s: float = 0.2,
    ack_wait_s: float = 30.0,
    retry_delay_s: float = 1.0,
    budgets: BudgetConfig | Path | None = None,
    clock: MsClock = now_ms,
    expiry_grace_s: float = 1.0,
    sweep_interval_s: float = 0.1,
    snapshot_interval_s: float = 30.0,
    pace_interval_s: float | None = None,
    grant_signer: GrantSigner | None = None,
    lease_s: float = LEASE_S,
    alerts: AlertConfig | Path | None = None,
) -> FastStream:
    """The accountant's app.

    ``database``: where the tables live (default: the database of ``settings.clickhouse_url``);
    created if missing. A batch is up to ``batch_size`` messages or what arrived within
    ``batch_timeout_s``. ``ack_wait_s`` is how long JetStream waits for an ack before it
    redelivers (after a crash, say); a failed insert is redelivered after ``retry_delay_s``.

    ``budgets``: the caps (default ``<deploy_dir>/budgets.toml``). ``clock`` gives the time in
    ms (tests move it). An unsettled reservation is reconciled (charged its call's metered cost, else
    its worst case: ``usage_watch.py``) ``expiry_grace_s`` after its deadline (a settle sent right at
    the deadline still finds its hold); holds are swept every ``sweep_interval_s``. The ledger is snapshotted
    every ``snapshot_interval_s``; pacing runs every ``pace_interval_s`` (default: the file's).
    ``grant_signer``: the key grants are signed with (default: ``load_signer``, from the environment
    or ``<home>/grant.seed``). ``lease_s``: how long a leader's lease outlives its last renewal, so
    how soon a standby takes over (``lease.py``).
    ``alerts``: the spend alert rules (default ``<deploy_dir>/alerts.toml``; ``alerts.py``).
    """
    bus = Bus(settings, SERVICE)
    app = bus.app()
    store = Store(settings.clickhouse_url, database)
    subjects = settings.subjects
    if not isinstance(budgets, BudgetConfig):
        budgets = BudgetConfig.load(budgets or settings.deploy_dir / BUDGETS_FILE)
    signer = grant_signer or load_signer(settings.home)
    accounts = Accounts(
        bus,
        budgets,
        clock,
        signer=signer,
        expiry_grace_ms=int(expiry_grace_s * 1000),
        sweep_interval_s=sweep_interval_s,
        snapshot_interval_s=snapshot_interval_s,
        pace_interval_s=pace_interval_s or budgets.pacing.interval_s,
    )

    @app.on_startup
    async def open_store() -> None:
        await store.open()
        # Not a secret: what an operator compares with the inference services' FRUGALMESH_GRANT_PUBLIC_KEY.
        bus.log.info("grant_key", public_key=signer.public_key)

    reservations = ReservationServer(bus, accounts)
    operators = OperatorChanges(bus, accounts)
    if not isinstance(alerts, AlertConfig):
        alerts = AlertConfig.load(alerts or settings.deploy_dir / ALERTS_FILE)
    alerting = Alerts(bus, store, accounts.book, alerts, clock)

    async def lead() -> asyncio.Event:
        """A term as leader (lease.py): no reservation is decided before the ledger is rebuilt and the
        switches are read."""
        await accounts.start()
        await reservations.subscribe()
        await operators.subscribe()
        alerting.start()  # the leader's alone, as pacing (alerts.py)
        assert accounts.journal is not None
        return accounts.journal.fenced

    async def resign(graceful: bool) -> None:
        # First stop answering: a deposed leader's answers are lost with its fenced journal.
        await reservations.unsubscribe()
        await operators.unsubscribe()
        await alerting.stop()
        # Graceful: store what the journal holds, which sends the replies parked on it.
        await (accounts.stop() if graceful else accounts.abandon())

    # Registered after bus.app()'s hook, which connects the broker.
    leadership = Leadership(bus, lead, resign, lease_s=lease_s)
    app.on_startup(leadership.start)
    app.on_shutdown(leadership.stop)

    @app.after_shutdown
    async def close_store() -> None:
        store.close()

    ingests: list[tuple[str, str, str, Sink[Any]]] = [
        (subjects.usage_all, STREAM_USAGE, DURABLE_USAGE_INGEST, USAGE),
        (subjects.task_events, STREAM_TASK_EVENTS, DURABLE_TASK_INGEST, TASKS),
        (subjects.artifact_created_all, STREAM_ARTIFACT_EVENTS, DURABLE_ARTIFACT_INGEST, ARTIFACTS),
        (subjects.control_kill, STREAM_CONTROL, DURABLE_KILL_INGEST, KILLS),
        (subjects.control_budget, STREAM_CONTROL, DURABLE_BUDGET_INGEST, BUDGET_CHANGES),
        (subjects.feedback_all, STREAM_FEEDBACK, DURABLE_FEEDBACK_INGEST, FEEDBACK),
    ]
    consumers: list[BatchConsumer] = []

    @app.after_startup
    async def start_ingest() -> None:
        # Here, not above: a pull is bound to the connection, which the broker makes at start.
        for subject, stream, durable, sink in ingests:
            pull = bus.pull(
                stream=subjects.stream(stream),
                subject=subject,
                durable=durable,
                # A fetch returns when batch_size messages arrived or batch_timeout_s passed.
                batch_size=batch_size,
                batch_timeout_s=batch_timeout_s,
                # Acks are the ingest's: each message only once its row is stored. Room for a few
                # replicas' batches in flight at once (the server default, 1000, would silently cap
                # a larger batch_size).
                config=ConsumerConfig(ack_wait=ack_wait_s, max_ack_pending=4 * batch_size),
            )
            consumer = BatchConsumer(Ingest(bus, store, sink, retry_delay_s), pull)
            consumers.append(consumer)
            await consumer.start()

    @app.on_shutdown
    async def stop_ingest() -> None:
        await asyncio.gather(*(consumer.stop() for consumer in consumers))

    return app
