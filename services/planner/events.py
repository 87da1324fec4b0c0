"""A task's events: progress live on core NATS, the terminal event stored with the whole history.

A task publishes ``accepted``, ``planned``, ``step_started``/``step_done`` per step (and
``refused``/``escalated`` where a defence acts) and then exactly one terminal event, each on
``mesh.task.event.<tenant>.<task>.<kind>``. Progress events are core NATS messages: whoever follows
the task sees them as they happen, and they cost the bus one message each, with no acknowledgement,
no stored copy and no delivery to the accountant; a task submitted with ``live_progress`` false
(a load replay, any submitter that waits only for the outcome) skips them. The terminal event is
the one JetStream stores (its stream takes only the terminal subjects), and it carries every earlier event of the run in
``history``: the audit trail that the stream kept one message per event for before (four messages
more per event: the publish acknowledgement, the accountant's delivery and its ack). The planner
acks a task's message only after that terminal event is stored.
"""

from __future__ import annotations

from schemas.messages import TERMINAL_EVENTS, ArtifactRef, Task, TaskEvent, TaskEventKind
from schemas.subjects import STREAM_TASK_EVENTS
from services.planner.state import RunTotals
from services.runtime.bus import Bus, encode, now_ms


class EventPublisher:
    """Publishes the events of every task this planner runs; ``forget`` a task that ended without its terminal event."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subjects = bus.subjects
        # Per task, by (tenant, task id) since ids are unique per tenant only: its events so far, the
        # history its terminal event carries.
        self._history: dict[tuple[str, str], list[TaskEvent]] = {}

    async def emit(
        self,
        task: Task,
        kind: TaskEventKind,
        *,
        step_id: str | None = None,
        detail: str = "",
        artifact: ArtifactRef | None = None,
        totals: RunTotals | None = None,
        agent: str = "",
    ) -> None:
        """Publish one event of ``task``; ``totals``: its calls and cost so far (none yet when not given);
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
            cost_usd=totals.cost_usd if totals else 0.0,
            calls=totals.calls if totals else 0,
            agent=agent,
        )
        subject = self.subjects.task_event(task.tenant, task.id, kind)
        if kind not in TERMINAL_EVENTS:
            self._history.setdefault((task.tenant, task.id), []).append(event)
            if task.live_progress:
                await self.bus.publish_core(subject, encode(event))
            return
        event.history = self._history.pop((task.tenant, task.id), [])
        # Stored before the task's message is acked: a failure here makes the task crash, so
        # JetStream redelivers it.
        await self.bus.publish(subject, event, stream=self.subjects.stream(STREAM_TASK_EVENTS))

    def forget(self, task: Task) -> None:
        """Drop the history of ``task`` (it ended without its terminal event)."""
        self._history.pop((task.tenant, task.id), None)
