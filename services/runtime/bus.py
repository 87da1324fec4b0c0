"""A service's connection to the mesh: its FastStream broker plus the few helpers every handler uses.

Handlers take the raw ``Message`` and decode with msgspec themselves (``Bus.decode``), so a
malformed or schema-invalid message never reaches service code: it goes whole to
``mesh.dlq.<service>`` with the reason, a request gets an error reply, and the service goes on.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Annotated, Any, TypeVar

import msgspec
from faststream import FastStream
from faststream._internal.context import Context  # the field class (faststream.Context builds one)
from faststream.nats import JStream, NatsBroker
from faststream.nats.message import NatsMessage
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from schemas.messages import DeadLetter, ErrorInfo, UsageEvent
from schemas.subjects import (
    HEADER_MSG_ID,
    STREAM_ARTIFACT_EVENTS,
    STREAM_CONTROL,
    STREAM_DLQ,
    STREAM_TASK_EVENTS,
    STREAM_TASKS,
    STREAM_USAGE,
    Subjects,
)
from services.runtime.log import configure as configure_logging
from services.runtime.settings import MeshSettings

T = TypeVar("T")

DAY_S = 24 * 3600.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


def stream_configs(subjects: Subjects) -> list[StreamConfig]:
    """The JetStream streams of the mesh; every service declares them idempotently on start."""
    return [
        StreamConfig(
            name=subjects.stream(STREAM_TASKS),
            subjects=[subjects.task_submit],
            retention=RetentionPolicy.WORK_QUEUE,
            # A resubmitted task with the same idempotency key is dropped inside this window.
            duplicate_window=600.0,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_TASK_EVENTS),
            subjects=[subjects.task_events],
            max_age=7 * DAY_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_USAGE),
            subjects=[subjects.usage_all],
            max_age=7 * DAY_S,
            # Dedupe on Nats-Msg-Id = event id: a publisher's retry never makes a second row.
            duplicate_window=600.0,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_CONTROL),
            subjects=[subjects.control_kill, subjects.control_pace],
            max_msgs_per_subject=10_000,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_ARTIFACT_EVENTS),
            subjects=[subjects.artifact_created_all],
            max_age=7 * DAY_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_DLQ),
            subjects=[subjects.dlq_all],
            max_age=30 * DAY_S,
            storage=StorageType.FILE,
        ),
    ]


class _ResolvedInPlace(Context):
    """FastStream's ``Context``, resolved on the event loop.

    fast_depends runs a custom field's synchronous ``use`` through ``anyio.to_thread``: one
    worker-thread round trip per message for nothing but a dictionary lookup (8% of the router's
    samples under load, plus the thread's own wake-ups; without it the mesh went from 152 to 211
    tasks/s, docs/benchmarks.md). An async ``use`` is awaited in place. (FastStream is pinned in
    pyproject.toml: this subclasses its internal field class.)
    """

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return super().use(**kwargs)


# A handler's ``msg: Message`` is the raw NATS message (headers, reply subject, ack).
Message = Annotated[NatsMessage, _ResolvedInPlace("message")]


def freeze_startup_objects() -> None:
    """Leave what a service loaded at start out of the garbage collector's full collections.

    The modules, settings, clients and tables loaded at start (about 100,000 objects) never die,
    yet every full collection walked them all: about 100 ms on these CPUs, a stall every message
    waiting in the process sat through (it was the accountant's reservation round trip's p99).
    What the service allocates later is still collected.
    """
    gc.collect()
    gc.freeze()


class Bus:
    """One per service process. ``broker`` is the FastStream NatsBroker to register handlers on."""

    def __init__(self, settings: MeshSettings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.subjects = settings.subjects
        self.log = configure_logging(service, settings.log_level)
        # FastStream logs every message at INFO; keep the hot path quiet unless asked.
        self.broker = NatsBroker(
            settings.nats_url,
            log_level=logging.DEBUG,
            logger=logging.getLogger(f"frugalmesh.{service}"),
            name=f"frugalmesh-{service}",
            max_reconnect_attempts=-1,
        )
        logging.getLogger(f"frugalmesh.{service}").setLevel(settings.log_level.upper())

    def app(self) -> FastStream:
        """A FastStream app whose startup declares the mesh's streams before any subscriber."""
        app = FastStream(self.broker, logger=self.log)

        @app.on_startup
        async def declare_streams() -> None:
            await self.broker.connect()
            await ensure_streams(self.broker.connection.jetstream(), self.subjects)

        @app.after_startup
        async def subscriptions_reached_server() -> None:
            # nats-py's flush() writes its PING straight to the socket, ahead of SUBs still in
            # the send queue, so one flush can return before the server knows a subscription;
            # the second round trip is ordered after them. Without it, a request sent right
            # after start-up can get "no responders".
            await self.broker.connection.flush()
            await self.broker.connection.flush()

        app.after_startup(freeze_startup_objects)

        @app.after_shutdown
        async def unfreeze() -> None:
            gc.unfreeze()  # in a process that goes on (tests), what was frozen can be collected again

        return app

    def stream(self, name: str) -> JStream:
        """A reference to a mesh stream for ``broker.subscriber(stream=...)`` (declared elsewhere)."""
        return JStream(name=self.subjects.stream(name), declare=False)

    # -- decoding and dead letters --

    async def decode(self, msg: Message, message_type: type[T]) -> T | None:
        """Decode ``msg`` as ``message_type``; on failure dead-letter it and return None."""
        try:
            return msgspec.json.decode(msg.body, type=message_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.dead_letter(msg.raw_message.subject, msg.body, msg.headers, f"{message_type.__name__}: {exc}")
            return None

    async def dead_letter(self, subject: str, data: bytes, headers: dict[str, str] | None, error: str) -> None:
        letter = DeadLetter(
            service=self.service,
            subject=subject,
            error=error,
            data=data,
            headers={k: str(v) for k, v in (headers or {}).items()},
            time_ms=now_ms(),
        )
        self.log.warning("dead_letter", subject=subject, error=error)
        await self.broker.publish(encode(letter), self.subjects.dlq(self.service), stream=self.subjects.stream(STREAM_DLQ))

    @staticmethod
    def rejection(reason: str) -> bytes:
        """The reply a requester gets for a message that could not be accepted."""
        return msgspec.json.encode({"v": 1, "error": ErrorInfo(kind="invalid", message=reason)})

    # -- publishing --

    async def publish_usage(self, event: UsageEvent) -> None:
        """Meter one call. Dedupe on the event id makes a retried publish harmless."""
        await self.broker.publish(
            encode(event),
            self.subjects.usage(event.tenant),
            headers={HEADER_MSG_ID: event.event_id},
            stream=self.subjects.stream(STREAM_USAGE),
        )

    async def request(
        self,
        subject: str,
        message: msgspec.Struct,
        reply_type: type[T],
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> T:
        # nats-py's request, not the broker's: FastStream's request path (publish command, codec, a
        # correlation id) cost more CPU than the round trip itself. The errors are nats-py's either way.
        reply = await self.broker.connection.request(subject, encode(message), timeout=timeout_s, headers=headers)
        return msgspec.json.decode(reply.data, type=reply_type)


async def ensure_streams(js: JetStreamContext, subjects: Subjects) -> None:
    for config in stream_configs(subjects):
        try:
            await js.add_stream(config=config)
        except BadRequestError:
            await js.update_stream(config=config)
