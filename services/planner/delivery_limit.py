"""A task whose message reaches the planner's delivery limit ends with a terminal ``failed`` event.

JetStream delivers a task's message at most ``max_deliver`` times (services/planner/app.py): a run
that raised is nacked and tried again, and so is one whose planner died (its ``ack_wait`` passed).
After the last delivery JetStream gives up on the message, and without this module the task would
vanish with no terminal event, its message left in the work queue. Two paths end it instead, each
with one ``failed`` event saying why, the task's message kept on the dead-letter subject:

- a run that raised on the message's last delivery: the planner that caught it ends the task, with
  the error and what its runs there sent and spent (services/planner/state.py, ``EarlierRuns``), and
  acks the message;
- a last delivery nobody ended (its planner died, or the ``failed`` event could not be published):
  JetStream announces it with its MAX_DELIVERIES advisory, which one planner replica receives (a
  queue group), reads the task from the stream, ends it and deletes the message.
"""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.messages import Task
from schemas.subjects import DURABLE_PLANNER, JS_EVENT, STREAM_TASKS
from services.planner.events import EventPublisher
from services.planner.state import EarlierRuns
from services.runtime.bus import Bus
from services.runtime.scrub import scrub

# A crashed run is delivered again after this pause, not at once.
REDELIVERY_DELAY_S = 1.0


class _MaxDeliveries(msgspec.Struct):
    """The fields the planner reads of JetStream's advisory (io.nats.jetstream.advisory.v1.max_deliver)."""

    stream_seq: int
    deliveries: int


def max_deliveries_advisory(stream: str, durable: str) -> str:
    """The subject on which JetStream announces a message of ``durable`` that reached its delivery limit."""
    return f"{JS_EVENT}.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"


class DeliveryLimit:
    """Ends the tasks JetStream gives up on; ``start`` it once the bus is connected, before tasks are pulled."""

    def __init__(self, bus: Bus, max_deliver: int, earlier_runs: EarlierRuns) -> None:
        self.bus = bus
        self.max_deliver = max_deliver
        # What the runs here of each task that raised sent and spent: its failed event reports it.
        self.earlier_runs = earlier_runs
        self.stream = bus.subjects.stream(STREAM_TASKS)
        # Its own publisher: it only publishes terminal events, of tasks whose runs are over.
        self.events = EventPublisher(bus)
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        subject = max_deliveries_advisory(self.stream, DURABLE_PLANNER)
        self._subscription = await self.bus.subscribe_core(subject, self._on_advisory, queue=self.bus.service)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def crashed(self, msg: Msg, task: Task, error: Exception) -> None:
        """After a run of ``task`` raised: nack its message for another delivery, or on the last one end it."""
        deliveries = msg.metadata.num_delivered
        if deliveries < self.max_deliver:
            await msg.nak(delay=REDELIVERY_DELAY_S)
            return
        reason = f"delivery limit: the planner failed this task {deliveries} times, the last with {error!r}"
        try:
            await self._give_up(task, msg.subject, msg.data, msg.headers, reason)
        except Exception:
            # JetStream gives up on the message after this nack, and its advisory tries once more.
            self.bus.log.exception("task_not_ended", task_id=task.id)
            await msg.nak()
            return
        await msg.ack()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = msgspec.json.decode(msg.data, type=_MaxDeliveries)
            stored = await self.bus.jetstream.get_msg(self.stream, advisory.stream_seq)
            data = stored.data or b""
            task = msgspec.json.decode(data, type=Task)
            reason = (
                f"delivery limit: the planner took this task {advisory.deliveries} times and no run ended it "
                "(each crashed, or its planner stopped)"
            )
            await self._give_up(task, stored.subject or "", data, stored.headers, reason)
            await self.bus.jetstream.delete_msg(self.stream, advisory.stream_seq)
        except Exception:
            # The message stays in the work queue, where an operator finds it.
            self.bus.log.exception("task_not_ended", advisory=msg.data.decode(errors="replace"))

    async def _give_up(
        self, task: Task, subject: str, data: bytes, headers: dict[str, str] | None, reason: str
    ) -> None:
        """End ``task`` ``failed`` with ``reason`` (scrubbed: an error's text may hold anything) and what its
        runs here sent and spent, and dead-letter its message."""
        reason = scrub(reason)
        totals = self.earlier_runs.take(task)
        try:
            await self.events.emit(task, "failed", detail=reason, totals=totals)
        except Exception:
            self.earlier_runs.keep(task, totals)  # for the advisory's try
            raise
        await self.bus.dead_letter(subject, data, headers, reason)
