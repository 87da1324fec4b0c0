"""A process's one way to NATS: its FastStream broker plus what FastStream does not do cheaply.

Services register their handlers on ``Bus.broker`` (FastStream). Everything else a service or the
CLI sends or reads goes through a ``Bus`` method, so this module is the only one that touches the
nats-py connection underneath:

- ``request``: request/reply whose error answer is the typed ``Rejection`` (raised as ``Rejected``);
- ``publish`` (JetStream, acknowledged), ``publish_pipelined`` (acknowledgement awaited later),
  ``publish_core`` (core NATS: load reports, a parked reply);
- ``key_value`` / ``object_store``: one get-or-create declarer for every bucket;
- ``pull``: a durable consumer fetched in real batches; ``consume``: one whose messages are handled
  as they arrive (both ``services.runtime.pull``);
- ``subscribe_core``: a plain subscription for the two measured hot paths (reserve and settle),
  where FastStream's per-message work cost several times the decision itself;
- ``add_service`` / ``gather``: NATS's own service framework (ADR-32, ``nats.micro``), on which
  agent services register, and the many-replies request that discovers them.

Handlers take the raw ``Message`` and decode with msgspec themselves (``Bus.decode``), so a
malformed or schema-invalid message never reaches service code: it goes whole to
``mesh.dlq.<service>`` with the reason, a request gets a ``Rejection``, and the service goes on.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
from faststream import FastStream
from faststream._internal.context import Context  # the field class (faststream.Context builds one)
from faststream.nats import JStream, NatsBroker
from faststream.nats.message import NatsMessage
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from nats.micro import Service, ServiceConfig, add_service

from schemas.messages import DeadLetter, ErrorInfo, ErrorKind, Rejection, UsageEvent
from schemas.subjects import STREAM_DLQ
from services.runtime.buckets import Buckets
from services.runtime.dead_letters import UNREADABLE, fit
from services.runtime.log import configure as configure_logging
from services.runtime.outbox import Outbox, outbox_path
from services.runtime.pull import BatchPull, PullConsumer
from services.runtime.settings import MeshSettings
from services.runtime.stored import publish_until_stored
from services.runtime.streams import ensure_streams

T = TypeVar("T")
# A JetStream API call (declare, stream info) on a cluster electing leaders for many new streams at once.
JETSTREAM_API_TIMEOUT_S = 10.0
# How long a publish is sent again while its stream has no leader (a cluster electing one: seconds).
ELECTION_S = 15.0

def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


class _ResolvedInPlace(Context):
    """FastStream's ``Context``, resolved on the event loop.

    fast_depends runs a custom field's synchronous ``use`` through ``anyio.to_thread``: a
    worker-thread round trip per message for nothing but a dictionary lookup. An async ``use`` is
    awaited in place (what it cost: docs/benchmarks.md, "the worker-thread hop"). FastStream is
    pinned in pyproject.toml because this subclasses its internal field class.
    """

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return super().use(**kwargs)


# A handler's ``msg: Message`` is the raw NATS message (headers, reply subject, ack).
Message = Annotated[NatsMessage, _ResolvedInPlace("message")]


def freeze_startup_objects() -> None:
    """Leave what a service loaded at start out of the garbage collector's full collections.

    The modules, settings, clients and tables loaded at start (about 100,000 objects) never die,
    yet every full collection walks them all, a stall that every message waiting in the process
    sits through (docs/benchmarks.md, "the freeze"). What the service allocates later is still
    collected.
    """
    gc.collect()
    gc.freeze()


async def _undecoded(message: NatsMessage) -> bytes:
    """FastStream's body decoder, replaced: handlers decode the raw message themselves (``Bus.decode``).
    FastStream's own (``json.loads``) would run first and raise on nesting past Python's stack, before
    the handler could dead-letter the message."""
    return message.body


class Rejected(Exception):
    """A request answered with a ``Rejection``: the service refused it before doing any work."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error.kind}: {error.message}")
        self.error = error


class Bus:
    """One per process. ``broker`` is the FastStream NatsBroker to register handlers on."""

    def __init__(
        self, settings: MeshSettings, service: str, *, reconnect_attempts: int = -1, connect_timeout_s: int = 2
    ) -> None:
        self.settings = settings
        self.service = service
        self.subjects = settings.subjects
        self.log = configure_logging(service, settings.log_level)
        # FastStream logs every message at INFO; keep the hot path quiet unless asked.
        self.broker = NatsBroker(
            settings.nats_servers,
            log_level=logging.DEBUG,
            logger=logging.getLogger(f"frugalmesh.{service}"),
            name=f"frugalmesh-{service}",
            max_reconnect_attempts=reconnect_attempts,
            connect_timeout=connect_timeout_s,
            decoder=_undecoded,
            error_cb=self._on_error,
            **settings.broker_options(),
        )
        logging.getLogger(f"frugalmesh.{service}").setLevel(settings.log_level.upper())
        self._js: JetStreamContext | None = None
        self._buckets = Buckets(lambda: self.jetstream, settings.replicas, settings.subjects, settings.nats_creds)
        self.outbox = Outbox(outbox_path(settings.home, settings.subject_prefix, service), self)

    async def _on_error(self, error: Exception) -> None:
        # A permission refused is said here: the refused request itself only times out.
        self.log.warning("nats_error", error=str(error), credential=str(self.settings.nats_creds))

    def app(self) -> FastStream:
        """A FastStream app whose startup declares the mesh's streams before any subscriber."""
        app = FastStream(self.broker, logger=self.log)

        @app.on_startup
        async def declare_streams() -> None:
            await self.connect()
            await self.declare_streams()

        @app.after_startup
        async def subscriptions_reached_server() -> None:
            await self.flush()

        app.after_startup(freeze_startup_objects)
        app.on_shutdown(self.outbox.stop)

        @app.after_shutdown
        async def unfreeze() -> None:
            gc.unfreeze()  # in a process that goes on (tests), what was frozen can be collected again

        return app

    async def declare_streams(self) -> None:
        """Create the mesh's streams, or update them to this version's configuration (idempotent), as far
        as this process's identity may (``identities.stream_rights``)."""
        rights = self._buckets
        await ensure_streams(
            self.jetstream, self.subjects, self.settings.replicas, only=rights.creatable, update=rights.updates
        )

    async def connect(self) -> None:
        """Connect without running an app (a client: the CLI, a test, a load generator)."""
        await self.broker.connect()
        self.outbox.start()

    async def close(self) -> None:
        """Flush what was published and disconnect (a client's counterpart of ``connect``)."""
        await self.outbox.stop()
        await self.broker.stop()

    async def flush(self) -> None:
        """Return once the server has seen everything sent before: publishes and subscriptions."""
        # nats-py's flush() writes its PING straight to the socket, ahead of SUBs still in the send
        # queue, so one flush can return before the server knows a subscription; the second round
        # trip is ordered after them. Without it, a request sent right after start-up can get
        # "no responders".
        await self._nc.flush()
        await self._nc.flush()

    @property
    def _nc(self) -> Client:
        return self.broker.connection

    @property
    def jetstream(self) -> JetStreamContext:
        """The JetStream context, for stream administration the helpers below do not cover (the
        accountant's ledger journal declares, replays and trims its own stream)."""
        if self._js is None:
            self._js = self._nc.jetstream(timeout=JETSTREAM_API_TIMEOUT_S)
        return self._js

    def stream(self, name: str) -> JStream:
        """A reference to a mesh stream for ``broker.subscriber(stream=...)`` (declared elsewhere)."""
        return JStream(name=self.subjects.stream(name), declare=False)

    # -- decoding, rejections and dead letters --

    async def decode(self, msg: Message | Msg, message_type: type[T]) -> T | None:
        """Decode ``msg`` (FastStream's, or nats-py's from a plain subscription) as ``message_type``; on
        failure dead-letter it and return None."""
        raw = msg if isinstance(msg, Msg) else msg.raw_message
        try:
            return msgspec.json.decode(raw.data, type=message_type)
        except UNREADABLE as exc:
            await self.dead_letter(raw.subject, raw.data, raw.headers, f"{message_type.__name__}: {exc}")
            return None

    async def dead_letter(self, subject: str, data: bytes, headers: dict[str, str] | None, error: str) -> None:
        """Keep a refused message on ``mesh.dlq.<service>`` with the reason. Never raises: bad input must
        not stop a service, so a letter that cannot be stored is logged instead.

        A letter too large for one NATS message keeps the message's first bytes (``dead_letters.fit``)."""
        letter = DeadLetter(
            service=self.service,
            subject=subject,
            error=error,
            data=data,
            headers={k: str(v) for k, v in (headers or {}).items()},
            time_ms=now_ms(),
        )
        try:
            # Room is left for the publish's own headers (the stream it expects, FastStream's ids).
            encoded = fit(letter, self._nc.max_payload - 1024)
            self.log.warning("dead_letter", subject=subject, error=letter.error)
            await self.broker.publish(encoded, self.subjects.dlq(self.service), stream=self.subjects.stream(STREAM_DLQ))
        except Exception:
            self.log.exception("dead_letter_lost", subject=subject, size=len(data))

    @staticmethod
    def rejection(reason: str, kind: ErrorKind = "invalid", *, retryable: bool = False) -> bytes:
        """The reply a requester gets for a message that could not be accepted."""
        return encode(Rejection(error=ErrorInfo(kind=kind, message=reason, retryable=retryable)))

    # -- request/reply --

    async def request(
        self,
        subject: str,
        message: msgspec.Struct,
        reply_type: type[T],
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> T:
        """Send ``message`` and decode the reply as ``reply_type``.

        Raises ``Rejected`` when the service answered a ``Rejection``, ``msgspec.DecodeError`` when
        the reply is neither, and nats-py's ``NoRespondersError`` / ``TimeoutError`` as they come.
        """
        # nats-py's request, not the broker's: FastStream's request path (publish command, codec, a
        # correlation id) cost more CPU than the round trip itself.
        reply = await self._nc.request(subject, encode(message), timeout=timeout_s, headers=headers)
        try:
            return msgspec.json.decode(reply.data, type=reply_type)
        except UNREADABLE as not_reply:
            try:
                rejection = _decode_rejection(reply.data)
            except UNREADABLE:
                if isinstance(not_reply, RecursionError):  # nesting past the stack: a DecodeError like the rest
                    raise msgspec.DecodeError(str(not_reply)) from None
                raise not_reply from None
            raise Rejected(rejection.error) from None

    # -- publishing --

    async def publish(
        self, subject: str, message: msgspec.Struct, *, stream: str, headers: dict[str, str] | None = None
    ) -> None:
        """Publish to JetStream stream ``stream`` (its full name) and wait for it to be stored; sent again
        while the stream has no leader (``stored.py``), for up to ``ELECTION_S``."""
        await publish_until_stored(
            self.jetstream, subject, encode(message), stream=stream, headers=headers, retry_s=ELECTION_S, log=self.log
        )

    async def publish_pipelined(
        self, subject: str, message: msgspec.Struct, *, stream: str, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Any]:
        """Send to JetStream now; the returned future is its acknowledgement, to await later.

        Many in flight on one connection keep their order and cost no round trip each (a single
        waited publish caps a sender at a few thousand a second).
        """
        return await self.jetstream.publish_async(subject, encode(message), stream=stream, headers=headers)

    async def publish_core(
        self, subject: str, data: bytes, *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Core NATS, fire and forget: the latest value wins (load reports), nobody stores it (a reply),
        or the receiver answers on ``reply`` itself (a JetStream write acknowledged to an inbox)."""
        await self._nc.publish(subject, data, reply=reply, headers=headers)

    async def publish_usage(self, event: UsageEvent) -> None:
        """Meter one call: stored in JetStream now, or kept on disk and sent until it is (``outbox.py``)."""
        await self.outbox.publish_usage(event)

    # -- subscriptions --

    async def subscribe_core(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        """A plain nats-py subscription, for hot paths measured to need it (``unsubscribe`` it to stop)."""
        return await self._nc.subscribe(subject, queue=queue, cb=handler)

    async def last_stored(self, stream: str, subject: str) -> bytes | None:
        """The last message ``stream`` (full name) keeps on ``subject`` (wildcards allowed), None if none.

        JetStream's direct get by subject: the subject is in the request's own subject, so a tenant's
        permission can allow it for its own tasks only (services/runtime/identities.py)."""
        try:
            return (await self.jetstream.get_msg(stream, subject=subject, direct=True)).data or b""
        except NotFoundError:
            return None

    def new_inbox(self) -> str:
        return self._nc.new_inbox()

    # -- NATS micro services (ADR-32) --

    async def add_service(self, config: ServiceConfig) -> Service:
        """Start a NATS micro service on this connection (``stop`` it before closing): it answers
        ``$SRV.PING|INFO|STATS`` and serves the endpoints added to it."""
        return await add_service(self._nc, config)

    async def request_bytes(self, subject: str, timeout_s: float, data: bytes = b"") -> bytes:
        """The first reply's bytes to a request on a subject outside the mesh's typed contract
        (``$SRV.STATS.<name>``); raises nats-py's ``NoRespondersError`` / ``TimeoutError``."""
        return (await self._nc.request(subject, data, timeout=timeout_s)).data

    async def gather(self, subject: str, window_s: float) -> list[bytes]:
        """Every reply to one request on ``subject`` that arrives within ``window_s``: a request many
        answer (``$SRV.INFO``: every instance of every service describes itself)."""
        inbox = self.new_inbox()
        replies: list[bytes] = []

        async def keep(msg: Msg) -> None:
            replies.append(msg.data)

        subscription = await self._nc.subscribe(inbox, cb=keep)
        try:
            await self._nc.publish(subject, b"", reply=inbox)
            await asyncio.sleep(window_s)
        finally:
            await subscription.unsubscribe()
        return replies

    def pull(
        self,
        *,
        stream: str,
        subject: str,
        durable: str,
        batch_size: int,
        batch_timeout_s: float,
        config: ConsumerConfig,
    ) -> BatchPull:
        """A durable consumer of ``subject`` on ``stream``, fetched in batches (call ``start`` first)."""
        return BatchPull(
            lambda: self._nc,
            stream=stream,
            subject=subject,
            durable=durable,
            batch_size=batch_size,
            batch_timeout_s=batch_timeout_s,
            config=config,
        )

    def consume(self, *, handle: Callable[[Msg], Awaitable[None]], **consumer: Any) -> PullConsumer:
        """A durable consumer whose messages ``handle`` gets as they come (``consumer``: PullConsumer's
        stream, subject, durable, window and config; ``start`` it once connected, ``stop`` it before closing)."""
        return PullConsumer(lambda: self._nc, handle=handle, **consumer)

    # -- buckets --

    async def key_value(self, bucket: str, *, history: int = 1, ttl_s: float | None = None) -> KeyValue:
        """The KV bucket of that name (its prefixed name: ``subjects.bucket(...)``), created with
        ``history`` and ``ttl_s`` if missing; an existing bucket is used as it is, but for its
        replica count, set to ``settings.replicas``."""
        return await self._buckets.key_value(bucket, history=history, ttl_s=ttl_s)

    async def object_store(self, bucket: str) -> ObjectStore:
        """The Object Store bucket of that name, created if missing; kept in ``settings.replicas`` copies."""
        return await self._buckets.object_store(bucket)


_decode_rejection = msgspec.json.Decoder(Rejection).decode
