"""A durable JetStream pull consumer fetched in real batches.

A fetch is one pull request for up to ``batch_size`` messages that expires after
``batch_timeout_s``: it returns when the batch is full or the server says the request ended
(expired, no messages). The messages are collected by a subscription callback, not one
``next_msg`` each: nats-py's ``fetch`` waits on every message with its own timeout, which cost
more than the ClickHouse insert the accountant's ingest makes of a batch. FastStream's batch
subscriber is built on that same fetch, so it is not used here either.

Get one from ``Bus.pull``; the bus owns the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from schemas.subjects import HEADER_STATUS, STATUS_HEARTBEAT, pull_request


class _InboxPull(ABC):
    """What both pull kinds share: a durable consumer of ``subject`` on ``stream``, declared at start
    unless it exists (an existing one is kept as it is, as nats-py's pull_subscribe does), and the
    inbox its messages arrive on, each handed to ``_on_message``."""

    def __init__(
        self, connection: Callable[[], Client], *, stream: str, subject: str, durable: str, config: ConsumerConfig
    ) -> None:
        # Resolved at start: a pull may be built before its process has connected.
        self._connection = connection
        self.nc: Client | None = None
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.config = config
        self._sub: Subscription | None = None
        self._inbox = ""

    async def start(self) -> None:
        nc = self.nc = self._connection()
        await ensure_durable(nc, self.stream, self.durable, self.subject, self.config)
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_message)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    @abstractmethod
    async def _on_message(self, msg: Msg) -> None:
        """One message or status on the inbox."""

    async def _ask_server(self, request: dict[str, int]) -> None:
        """Send one pull request for this consumer; its messages arrive on the inbox."""
        assert self.nc is not None, f"{type(self).__name__} before start"
        await self.nc.publish(pull_request(self.stream, self.durable), msgspec.json.encode(request), reply=self._inbox)


class BatchPull(_InboxPull):
    def __init__(
        self,
        connection: Callable[[], Client],
        *,
        stream: str,
        subject: str,
        durable: str,
        batch_size: int,
        batch_timeout_s: float,
        config: ConsumerConfig,
    ) -> None:
        super().__init__(connection, stream=stream, subject=subject, durable=durable, config=config)
        self.batch_size = batch_size
        self.batch_timeout_s = batch_timeout_s
        self._received: list[Msg] = []
        self._ended = 0  # status messages seen (each ends one pull request)
        self._arrived = asyncio.Event()

    async def _on_message(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(HEADER_STATUS):
            if msg.headers[HEADER_STATUS] != STATUS_HEARTBEAT:
                self._ended += 1
        else:
            self._received.append(msg)
        self._arrived.set()

    async def fetch(self) -> list[Msg]:
        """One pull request: up to ``batch_size`` messages, within about ``batch_timeout_s``."""
        ended = self._ended
        request = {"batch": self.batch_size - len(self._received), "expires": int(self.batch_timeout_s * 1e9)}
        if request["batch"] > 0:
            await self._ask_server(request)
            # The server ends the request at its expiry; the client's own limit only covers a lost reply.
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that lands
            # as the wait ends, and a stop then waited on a fetch loop that went on fetching.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.batch_timeout_s + 1.0):
                    while len(self._received) < self.batch_size and self._ended == ended:
                        self._arrived.clear()
                        await self._arrived.wait()
        batch, self._received = self._received, []
        return batch


async def ensure_durable(nc: Client, stream: str, durable: str, subject: str, config: ConsumerConfig) -> None:
    """Declare the durable consumer unless it exists. An existing one is kept as it is (as nats-py's
    pull_subscribe does), but for its subject: one declared by an older version on a subject since
    renamed (``mesh.task.submit`` became ``mesh.task.submit.<tenant>``) would never be delivered a
    message again, so it is updated to this one, keeping its place in the stream."""
    js = nc.jetstream()
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        await js.add_consumer(stream, config=durable_config(config, durable, subject))
        return
    if info.config.filter_subject != subject:
        updated = dataclasses.replace(info.config, filter_subject=subject)
        await js.add_consumer(stream, config=updated)


def durable_config(config: ConsumerConfig, durable: str, subject: str) -> ConsumerConfig:
    """``config`` as the durable consumer ``durable`` of ``subject`` with explicit acks."""
    return dataclasses.replace(
        config,
        name=durable,
        durable_name=durable,
        filter_subject=subject,
        ack_policy=config.ack_policy or AckPolicy.EXPLICIT,
    )


# How long one pull request of a PullConsumer stays open at the server before it is renewed.
PULL_EXPIRES_S = 30.0
# While a request is open and idle, the server says so this often; three beats of silence mean the
# requests were lost (a restarted server, a reconnection) and are asked again.
PULL_HEARTBEAT_S = 5.0
# JetStream's header on a pull request's end: how many messages of it were never delivered.
HEADER_PENDING_MESSAGES = "Nats-Pending-Messages"


class PullConsumer(_InboxPull):
    """A durable pull consumer whose messages are handed over one by one as they arrive, with at most
    ``window`` asked for at a time (what nats.go calls ``Consume``).

    A fetch loop (``BatchPull``; FastStream's pull subscriber) pays a round trip per fetch and, with
    batches, makes the first message of a quiet spell wait for the batch to fill or the request to
    expire. Here pull requests stay open (``PULL_EXPIRES_S``) and each message is handled the moment
    it comes; once half the window has been used, one request asks for that half again. ``handle``
    runs on the subscription's callback, so a handler that waits (a full replica waiting for a free
    slot) stops the refills: the consumer then holds at most ``window`` messages it has not started,
    and the rest stay in the stream for other replicas.
    """

    def __init__(
        self,
        connection: Callable[[], Client],
        *,
        stream: str,
        subject: str,
        durable: str,
        window: int,
        config: ConsumerConfig,
        handle: Callable[[Msg], Awaitable[None]],
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, not {window}")
        super().__init__(connection, stream=stream, subject=subject, durable=durable, config=config)
        self.window = window
        self.handle = handle
        # Messages asked for and not yet delivered (or given back by an ended request).
        self._asked = 0
        # When the server last said anything on the inbox (a message or a request's end).
        self._heard = time.monotonic()
        # True while ``handle`` runs: a full replica's handler waits, and its silence is not a loss.
        self._handling = False
        self._renewing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        await self._ask()
        self._renewing = asyncio.create_task(self._renew())

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        await super().stop()

    async def _on_message(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        status = msg.headers.get(HEADER_STATUS) if msg.headers else None
        if status is not None:
            if status != STATUS_HEARTBEAT:
                # A request ended (expired, or the consumer changed): what it did not deliver is asked again.
                self._asked -= int(msg.headers.get(HEADER_PENDING_MESSAGES, 0) if msg.headers else 0)
                await self._ask()
            return
        self._asked -= 1
        self._handling = True
        try:
            await self.handle(msg)
        finally:
            self._handling = False
        await self._ask()

    async def _ask(self) -> None:
        """Ask for what the window lacks, once it lacks at least half of it."""
        missing = self.window - max(self._asked, 0)
        if missing < self.window // 2:
            return
        request = {
            "batch": missing,
            "expires": int(PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
        }
        await self._ask_server(request)
        self._asked = max(self._asked, 0) + missing

    async def _renew(self) -> None:
        """Ask again when the server has been silent for three heartbeats while nothing was being
        handled: the open requests were lost (a restarted server, a reconnection), and the window
        would otherwise stay counted as asked for with nothing coming."""
        while True:
            await asyncio.sleep(PULL_HEARTBEAT_S)
            if not self._handling and time.monotonic() - self._heard > 3 * PULL_HEARTBEAT_S:
                self._asked = 0
                await self._ask()
