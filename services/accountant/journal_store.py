"""What the ledger's journal stores, and where: its messages, its snapshot, and how a term reads them
back (``recover``).

A journal message is one ``JournalBatch``: the operations of one commit, in ledger order (journal.py
writes them). The snapshot (Object Store ``<prefix>_ledger``, name ``SNAPSHOT``) is the whole ledger
after a first line holding the sequence of the last journal message it includes (``save_snapshot``);
a term rebuilds the ledger from it and replays the messages after that sequence.
"""

from __future__ import annotations

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy, ObjectMeta
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore

from services.accountant.ledger import Ledger, Op
from services.runtime.bus import Bus

SNAPSHOT = "snapshot"
REPLAY_WAIT_S = 10.0  # for each journal message of the replay


class JournalWriteError(Exception):
    """JetStream did not store a journal message: it refused it, or did not acknowledge it in time."""


class JournalBatch(msgspec.Struct):
    """One journal message: the operations of one commit, in ledger order."""

    ops: list[Op]


class _ApiError(msgspec.Struct):
    description: str = ""


class PubAck(msgspec.Struct):
    """JetStream's answer to a journal write: the message's sequence, or why it was not stored."""

    seq: int = 0
    error: _ApiError | None = None


decode_batch = msgspec.json.Decoder(JournalBatch).decode
decode_ack = msgspec.json.Decoder(PubAck).decode


async def recover(bus: Bus, store: ObjectStore, subject: str, stream: str) -> tuple[Ledger, int]:
    """The ledger as of the journal's last message, and that message's sequence."""
    try:
        stored = (await store.get(SNAPSHOT)).data
        if stored is None:
            raise ObjectNotFoundError
        header, state = stored.split(b"\n", 1)
        ledger, seq = Ledger.restore(state), int(header)
    except ObjectNotFoundError:
        ledger, seq = Ledger(), 0
    last = (await bus.jetstream.stream_info(stream)).state.last_seq
    replayed = 0
    if last > seq:
        sub = await bus.jetstream.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq + 1),
        )
        try:
            first = seq + 1
            while True:
                msg = await sub.next_msg(timeout=REPLAY_WAIT_S)
                if first and msg.metadata.sequence.stream > first:
                    # Purged past this snapshot meanwhile (a deposed leader's late snapshot): read again.
                    raise JournalWriteError(f"journal purged past snapshot {seq} during the replay")
                first = 0
                for op in decode_batch(msg.data).ops:
                    ledger.apply(op)
                    replayed += 1
                if msg.metadata.sequence.stream >= last:
                    break
        finally:
            await sub.unsubscribe()
    bus.log.info("ledger_recovered", snapshot_seq=seq, replayed_ops=replayed, holds=len(ledger.holds))
    return ledger, last


async def save_snapshot(bus: Bus, store: ObjectStore, stream: str, state: bytes, seq: int) -> None:
    """Store ``state``, the ledger as of journal message ``seq``, then purge the journal up to it;
    nothing when the stored snapshot is newer (a deposed leader's late one is out of date)."""
    try:
        stored = int((await store.get_info(SNAPSHOT)).description or 0)
    except ObjectNotFoundError:
        stored = 0
    if stored > seq:
        return
    # A header line carries the sequence, known only once the commit was stored; the description too,
    # so the check above reads it without fetching the snapshot.
    await store.put(SNAPSHOT, b"%d\n" % seq + state, meta=ObjectMeta(SNAPSHOT, description=str(seq)))
    # Only after the snapshot is stored may the operations it covers go.
    await bus.jetstream.purge_stream(stream, seq=seq + 1)
    bus.log.debug("ledger_snapshot", seq=seq, bytes=len(state))
