"""A durable local outbox: usage events and settles that the bus cannot take now are kept on disk and sent
again, in order, until they land, so a short NATS outage (a nats-server restarted, a network blip) loses
neither a usage row nor a settle.

What goes in, and when:

- a usage event (``Bus.publish_usage``) is published at once; only one JetStream did not acknowledge
  within ``FIRST_TRY_S`` (the server down, no stream leader, a refused write) is written to the outbox.
  While the outbox holds usage events, a new one goes behind them, so the outbox sends in the order
  the process metered;
- a settle (``ReservationClient.settle``) that no accountant answered within the client's own failover
  window is written to the outbox.

A background task sends what the outbox holds, oldest first, each kind in its own order (a settle
waiting for an accountant does not hold usage events back), and deletes a row only once it landed:
a usage event once JetStream acknowledged it (its ``Nats-Msg-Id`` is the event id, so a resend of one
already stored is dropped by the stream), a settle once the accountant answered (it counts a settle
once per reservation id). A row the server refuses for good (a JetStream error other than 503, a
settle answered with a ``Rejection``) is dead-lettered with the reason and deleted: sending it again
cannot help. A process that starts finds what an earlier run left and sends it.

Why on failure, not before every publish: writing each event to disk first (an fsync'd insert and a
delete per call) would put disk syncs on every metered call: a synced append alone costs two to four
times the publish it would guard (``python -m loadtest.bench.outbox``, docs/benchmarks.md), while the
hot path as built costs nothing measurable over a bare publish. The price: a process that crashes
while an event waits for its first acknowledgement (normally about a millisecond; up to
``FIRST_TRY_S`` while the server is away) loses that event, and one that crashes during a settle's
failover window loses the settle. A lost settle lets no spend escape (its hold is charged from the
call's usage row, or its worst case, when it expires: services/accountant/usage_watch.py); a lost
usage event leaves its call without a row.

Why SQLite (the standard library's ``sqlite3``): it gives an atomic, synced append, deletion of what
landed, reading in order and recovery after a crash mid-write, all of which an append-only file
would need its own framing, checksums and compaction for. The database is in WAL mode with
``synchronous=FULL``: a row is on disk when the append returns, also across a power loss. Appends
run on the event loop: they happen only when the bus is failing, where a few milliseconds are nothing.

Where: ``<home>/outbox/<subject prefix>.<service>.sqlite3`` (0600), created on the first append, so a
process that never fails writes nothing. Replicas of one service sharing a home share the file; each
may send the other's rows, which the dedupe and the accountant make harmless.

The bound: ``max_bytes`` of payload (``MAX_BYTES``, 64 MiB: tens of thousands of usage events, hours
of a busy process's calls). When full, a new entry is not kept: the outbox logs ``outbox_full`` once
(with what it holds) and then ``outbox_dropped`` per entry, naming its kind and id, so an operator
can tell which calls lack a row or a settle. A full outbox means the bus has been away far longer
than "a short outage"; it drains as soon as the bus is back.

Not done: an outage longer than the usage stream's dedupe window (10 minutes) may store a usage
event twice whose first try was stored but not acknowledged; the ``usage_events`` table keeps one row
per event id (ReplacingMergeTree), so the books count it once after a merge (``FINAL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Literal, Protocol

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError

from schemas.messages import Reservation, ReservationDecision, UsageEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_USAGE, Subjects

Kind = Literal["usage", "settle"]
KINDS: tuple[Kind, ...] = ("usage", "settle")
# How long the hot path waits for a usage event's acknowledgement before the outbox takes it.
FIRST_TRY_S = 2.0
# How long a resend waits for its acknowledgement or answer.
RESEND_TIMEOUT_S = 2.0
# Between rounds of resends while the bus refuses them.
RETRY_S = 0.5
# Rows read per round, per kind.
BATCH = 100
MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    stream TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    data BLOB NOT NULL,
    queued_ms INTEGER NOT NULL
)"""


class Sender(Protocol):
    """What the outbox sends through and reports to: the process's ``Bus``."""

    @property
    def jetstream(self) -> JetStreamContext: ...
    @property
    def subjects(self) -> Subjects: ...
    @property
    def log(self) -> structlog.stdlib.BoundLogger: ...

    async def request(
        self, subject: str, message: msgspec.Struct, reply_type: type[ReservationDecision], timeout_s: float
    ) -> ReservationDecision: ...

    async def dead_letter(self, subject: str, data: bytes, headers: dict[str, str] | None, error: str) -> None: ...


def outbox_path(home: Path, prefix: str, service: str) -> Path:
    return home / "outbox" / f"{prefix}.{service}.sqlite3"


class _Refused(Exception):
    """The far side refused an entry for good: it is dead-lettered, not sent again."""


class Outbox:
    def __init__(self, path: Path, sender: Sender, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.sender = sender
        self.max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        # Entries of each kind waiting in the file, as this process last counted them.
        self._queued: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._full = False
        self._resender: asyncio.Task[None] | None = None
        self._stopped = False

    # -- the hot path --

    async def publish_usage(self, event: UsageEvent) -> None:
        """Store a usage event in JetStream now, or keep it here to be sent until it is."""
        subject, stream = self.sender.subjects.usage(event.tenant), self.sender.subjects.stream(STREAM_USAGE)
        data, event_id = msgspec.json.encode(event), event.event_id
        if not self._queued["usage"]:  # else it goes behind those waiting
            try:
                await self._store(subject, stream, data, event_id, FIRST_TRY_S)
                return
            except (nats.errors.Error, TimeoutError) as exc:
                self.sender.log.warning("usage_to_outbox", event_id=event_id, error=type(exc).__name__)
            except _Refused as exc:
                await self.sender.dead_letter(subject, data, {HEADER_MSG_ID: event_id}, str(exc))
                return
        self._append("usage", subject, stream, event_id, data)

    def settle_later(self, settle: Reservation) -> None:
        """Keep a settle no accountant answered, to be sent until one does."""
        self.sender.log.warning("settle_to_outbox", reservation_id=settle.id)
        self._append("settle", self.sender.subjects.budget_settle, "", settle.id, msgspec.json.encode(settle))

    # -- lifetime --

    def start(self) -> None:
        """Send what an earlier run left (call once connected)."""
        self._stopped = False
        if self.path.exists() and any(self.waiting().values()):
            self.sender.log.warning("outbox_resending", path=str(self.path), waiting=self._queued, bytes=self._bytes)
            self._wake()

    async def stop(self) -> None:
        """Stop sending; what is left, and what comes later, stays on disk for the next run."""
        self._stopped = True
        if self._resender is not None:
            self._resender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resender
            self._resender = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def waiting(self) -> dict[Kind, int]:
        """How many entries of each kind wait in the file (none where there is no file)."""
        if self._db is None and not self.path.exists():
            return dict.fromkeys(KINDS, 0)
        counts = dict(self._open().execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall())
        self._queued = {kind: counts.get(kind, 0) for kind in KINDS}
        return dict(self._queued)

    # -- the file --

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # owner only, before SQLite makes it
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)  # each statement commits
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            self._db = db
            self._bytes = db.execute("SELECT coalesce(sum(length(data)), 0) FROM outbox").fetchone()[0]
        return self._db

    def _append(self, kind: Kind, subject: str, stream: str, entry_id: str, data: bytes) -> None:
        try:
            db = self._open()
            if self._bytes + len(data) > self.max_bytes:
                if not self._full:
                    self._full = True
                    self.sender.log.error(
                        "outbox_full", path=str(self.path), bytes=self._bytes, max_bytes=self.max_bytes,
                        waiting=self.waiting(), consequence="new entries are dropped until it drains",
                    )  # fmt: skip
                self.sender.log.error("outbox_dropped", kind=kind, id=entry_id, subject=subject)
                return
            db.execute(
                "INSERT INTO outbox (kind, subject, stream, entry_id, data, queued_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (kind, subject, stream, entry_id, data, time.time_ns() // 1_000_000),
            )
        except sqlite3.Error as exc:  # a disk full or unwritable: as a full outbox, the entry named
            self.sender.log.error("outbox_dropped", kind=kind, id=entry_id, subject=subject, error=str(exc))
            return
        self._bytes += len(data)
        self._queued[kind] += 1
        self._wake()

    def _remove(self, kind: Kind, seq: int, size: int) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        self._bytes -= size
        self._queued[kind] = max(self._queued[kind] - 1, 0)
        if self._full and self._bytes <= self.max_bytes // 2:
            self._full = False
            self.sender.log.warning("outbox_has_room", bytes=self._bytes)

    # -- sending --

    def _wake(self) -> None:
        if (self._resender is None or self._resender.done()) and not self._stopped:
            self._resender = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        """Send every entry, oldest first per kind, until the file is empty."""
        while any(self.waiting().values()):
            try:
                sent_all = await self._send_round()
            except sqlite3.Error:
                self.sender.log.exception("outbox_unreadable", path=str(self.path))
                sent_all = False
            if not sent_all:
                await asyncio.sleep(RETRY_S)
        self.sender.log.info("outbox_empty")

    async def _send_round(self) -> bool:
        """Send up to ``BATCH`` entries of each kind, in order; False when one could not be sent."""
        db = self._open()
        sent_all = True
        for kind in KINDS:
            rows = db.execute(
                "SELECT seq, subject, stream, entry_id, data FROM outbox WHERE kind = ? ORDER BY seq LIMIT ?",
                (kind, BATCH),
            ).fetchall()
            for seq, subject, stream, entry_id, data in rows:
                try:
                    await self._send(kind, subject, stream, entry_id, data)
                except _Refused as exc:
                    await self.sender.dead_letter(subject, data, {HEADER_MSG_ID: entry_id}, str(exc))
                except (nats.errors.Error, TimeoutError):
                    sent_all = False
                    break  # keep this kind's order: the rest wait for this one
                self._remove(kind, seq, len(data))
        return sent_all

    async def _send(self, kind: Kind, subject: str, stream: str, entry_id: str, data: bytes) -> None:
        if kind == "usage":
            await self._store(subject, stream, data, entry_id, RESEND_TIMEOUT_S)
            return
        try:
            settle = msgspec.json.decode(data, type=Reservation)
            decision = await self.sender.request(subject, settle, ReservationDecision, RESEND_TIMEOUT_S)
        except (nats.errors.Error, TimeoutError):
            raise  # no accountant, no server: it may answer later
        except Exception as exc:
            # Unreadable, a ``Rejection`` (Bus.request's ``Rejected``) or a reply that is neither: it will not change.
            raise _Refused(f"settle refused: {type(exc).__name__}: {exc}") from None
        if not decision.granted:
            self.sender.log.warning("settle_refused", reservation_id=settle.id, reason=decision.reason)

    async def _store(self, subject: str, stream: str, data: bytes, event_id: str, timeout_s: float) -> None:
        """Raises nats-py's errors for what may pass (no leader, no server, no acknowledgement yet), and
        ``_Refused`` for a JetStream error that will not."""
        try:
            await self.sender.jetstream.publish(
                subject, data, timeout=timeout_s, stream=stream, headers={HEADER_MSG_ID: event_id}
            )
        except ServiceUnavailableError:
            raise
        except APIError as exc:
            raise _Refused(f"JetStream refused the usage event: {exc}") from None
