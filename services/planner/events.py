"""A task's events on its JetStream subject: progress pipelined, the terminal event acknowledged.

A task publishes ``accepted``, ``planned``, ``step_started``/``step_done`` per step (and
``refused``/``escalated`` where a defence acts) and then exactly one terminal event. Progress
events are sent at once, in order, on the one connection, and their acknowledgements are only
collected before the terminal event: a task's progress costs no JetStream round trip per event,
yet nothing is lost, because the terminal event waits until every earlier one is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.messages import TERMINAL_EVENTS, ArtifactRef, Task, TaskEvent, TaskEventKind
from schemas.subjects import STREAM_TASK_EVENTS
from services.planner.state import TaskState
from services.runtime.bus import Bus, now_ms


class EventPublisher:
    """Publishes the events of every task this planner runs; ``forget`` a task that ended without its terminal event."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.subjects = bus.subjects
        # How long the terminal event waits for the progress events' acknowledgements.
        self.timeout_s = timeout_s
        # Per task id: the acknowledgements of its progress events, awaited before its terminal event.
        self._unacked: dict[str, list[asyncio.Future[Any]]] = {}

    async def emit(
        self,
        task: Task,
        kind: TaskEventKind,
        *,
        step_id: str | None = None,
        detail: str = "",
        artifact: ArtifactRef | None = None,
        state: TaskState | None = None,
        agent: str = "",
    ) -> None:
        """Publish one event of ``task``; its cost and calls so far come from ``state`` when given;
        ``agent``: the agent service running the step."""
        event = TaskEvent(
            task_id=task.id,
            kind=kind,
            time_ms=now_ms(),
            tenant=task.tenant,
            workflow=task.workflow,
            step_id=step_id,
            detail=detail,
            artifact=artifact,
            cost_usd=state.cost_usd if state else 0.0,
            calls=state.calls if state else 0,
            agent=agent,
        )
        subject, stream = self.subjects.task_event(task.id), self.subjects.stream(STREAM_TASK_EVENTS)
        if kind not in TERMINAL_EVENTS:
            ack = await self.bus.publish_pipelined(subject, event, stream=stream)
            self._unacked.setdefault(task.id, []).append(ack)
            return
        # Every earlier event must be stored before the terminal one: the task's message is acked
        # after it, and a failure here makes the task crash, so JetStream redelivers it.
        unacked = self._unacked.pop(task.id, [])
        if unacked:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.gather(*unacked)
        await self.bus.publish(subject, event, stream=stream)

    def forget(self, task: Task) -> None:
        """Drop the acknowledgements still awaited for ``task``'s events (it ended without its terminal event)."""
        for ack in self._unacked.pop(task.id, []):
            if ack.done() and not ack.cancelled():
                ack.exception()  # retrieved: the task already failed for its own reason
            ack.cancel()
