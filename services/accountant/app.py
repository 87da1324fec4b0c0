"""The accountant: ClickHouse ingest of usage events, terminal task events and artifacts.

Each stream has its own durable pull consumer (shared by every accountant replica) fetched in
real batches, so one batch is one INSERT; see ``ingest.py`` for the exactly-once rules.
"""

from __future__ import annotations

from typing import Annotated, Any

from faststream import AckPolicy, Context, FastStream
from faststream.nats import PullSub
from faststream.nats.message import NatsBatchMessage
from nats.js.api import ConsumerConfig

from schemas.subjects import STREAM_ARTIFACT_EVENTS, STREAM_TASK_EVENTS, STREAM_USAGE
from services.accountant.ingest import ARTIFACTS, TASKS, USAGE, Ingest, Sink, Store
from services.runtime.bus import Bus
from services.runtime.settings import MeshSettings

SERVICE = "accountant"

# A batch handler gets the whole fetched batch; FastStream's NatsMessage annotation is per message.
BatchMessage = Annotated[NatsBatchMessage, Context("message")]


def create_app(
    settings: MeshSettings,
    *,
    database: str | None = None,
    batch_size: int = 1000,
    batch_timeout_s: float = 0.2,
    ack_wait_s: float = 30.0,
    retry_delay_s: float = 1.0,
) -> FastStream:
    """The accountant's app.

    ``database``: where the tables live (default: the database of ``settings.clickhouse_url``);
    created if missing. A batch is up to ``batch_size`` messages or what arrived within
    ``batch_timeout_s``. ``ack_wait_s`` is how long JetStream waits for an ack before it
    redelivers (after a crash, say); a failed insert is redelivered after ``retry_delay_s``.
    """
    bus = Bus(settings, SERVICE)
    app = bus.app()
    store = Store(settings.clickhouse_url, database)
    subjects = settings.subjects

    @app.on_startup
    async def open_store() -> None:
        await store.open()

    @app.after_shutdown
    async def close_store() -> None:
        store.close()

    def consume(subject: str, stream: str, durable: str, sink: Sink[Any]) -> None:
        ingest = Ingest(bus, store, sink, retry_delay_s)

        @bus.broker.subscriber(
            subject,
            stream=bus.stream(stream),
            durable=durable,
            # A fetch returns when batch_size messages arrived or batch_timeout_s passed.
            pull_sub=PullSub(batch_size=batch_size, timeout=batch_timeout_s, batch=True),
            # Acks are the ingest's: each message only once its row is stored.
            ack_policy=AckPolicy.MANUAL,
            # Room for a few replicas' batches in flight at once (the server default, 1000,
            # would silently cap a larger batch_size).
            config=ConsumerConfig(ack_wait=ack_wait_s, max_ack_pending=4 * batch_size),
        )
        async def handle(msg: BatchMessage) -> None:
            await ingest(msg.raw_message)

    consume(subjects.usage_all, STREAM_USAGE, "accountant", USAGE)
    consume(subjects.task_events, STREAM_TASK_EVENTS, "accountant-tasks", TASKS)
    consume(subjects.artifact_created_all, STREAM_ARTIFACT_EVENTS, "accountant-artifacts", ARTIFACTS)
    return app
