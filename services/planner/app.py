"""planner: takes tasks from the ``planner`` durable pull consumer as they arrive (``Bus.consume``) and
runs each as its own asyncio task.

The consumer is shared by every replica (the TASKS stream is a work queue), so each task runs
once. The handler only decodes the task and hands it to a background asyncio task: a task waiting
on its models costs a coroutine, not a worker, and one slow task never holds up the others.
``max_in_flight`` bounds how many run at once in this replica (thousands: what bounds it is memory
and CPU). That is the back-pressure: a full replica's handler waits for a free slot, which stops
its pulls, so the tasks stay in the stream for replicas with room instead of in its buffers (a pull
consumer hands out only what is asked for: ``pull_window`` at most). The consumer's
``max_ack_pending`` is set far above any replica's bound, so the server never caps the mesh's
tasks in flight below what the replicas hold.

A task's message is acked only after its terminal event is published; while it runs,
``in_progress`` keeps JetStream from redelivering it, however long its deadline (one sweep a second
marks the tasks that are due, services/planner/keep_alive.py). If the planner
dies mid-task the message comes back after ``ack_wait_s`` and another replica runs the task again
(artifacts are content-addressed, so reruns store nothing twice). A run that raises is nacked and
delivered again, at most ``MAX_DELIVER`` times in all, and the next run here reports the calls and
spend of the one that raised with its own (``Planner.earlier_runs``); a task still not ended after its last delivery
gets a terminal ``failed`` event saying so (services/planner/delivery_limit.py). A delivery of a task
whose run is still going on here (its marks came too late, or the consumer's new leader lost its latest
deliveries) joins that run: it is marked and acked with it, and the task never runs twice at once here.

Every replica also runs the scheduler (services/planner/schedule.py); JetStream's dedupe makes each
scheduled run fire once however many replicas submit it. Limits and estimate profiles come from
``deploy/planner.toml`` (services/planner/config.py).
"""

from __future__ import annotations

import asyncio
import contextlib

from faststream import FastStream
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from schemas.messages import Task
from schemas.subjects import DURABLE_PLANNER, HEADER_SCHEDULE_RUN, STREAM_TASKS, Subjects, token
from services.planner.antiloop import AttemptCounter
from services.planner.config import Limits, PlannerConfig
from services.planner.dag import Planner
from services.planner.delivery_limit import DeliveryLimit
from services.planner.keep_alive import KeepAlive
from services.planner.preflight import Preflight
from services.planner.schedule import Scheduler, WallClock, utc_now
from services.planner.workflow import load_workflows
from services.runtime.bus import Bus
from services.runtime.settings import MeshSettings

SERVICE = "planner"
# A task that crashes the planner is not retried for ever: that is how runaway loops start.
MAX_DELIVER = 3
# Tasks asked of the stream at a time: handed over as they arrive (services/runtime/pull.py
# PullConsumer), so a burst is taken without a round trip per task and a lone task without waiting.
DEFAULT_PULL_WINDOW = 64
# Tasks one replica runs at once by default (each a coroutine and its state: a few KB).
DEFAULT_MAX_IN_FLIGHT = 10_000
# Tasks taken and not yet acked across all replicas; nats-server's default (1,000) would cap the
# whole mesh below one replica's bound.
MAX_ACK_PENDING = 1_000_000


def create_app(
    settings: MeshSettings,
    *,
    max_fanout: int = 9,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ack_wait_s: float = 60.0,
    pull_window: int = DEFAULT_PULL_WINDOW,
    limits: Limits | None = None,
    clock: WallClock = utc_now,
    schedule_tick_s: float = 1.0,
) -> FastStream:
    """The planner. Workflows, planner.toml, the price and routing tables and the recorded accuracy
    all load now, so a bad file fails here rather than half-way through a task.

    ``max_fanout``: parallel steps per task (a workflow may ask for fewer). ``max_in_flight``:
    tasks running at once in this replica. ``ack_wait_s``: how long a silent replica keeps a task.
    ``pull_window``: tasks asked of the stream at a time.
    ``limits``: layer-2 limits instead of planner.toml's. ``clock`` (UTC) and ``schedule_tick_s``:
    the scheduler's time and how often it looks at it; the clock also dates the attempt counts.
    """
    bus = Bus(settings, SERVICE)
    app = bus.app()
    config = PlannerConfig.load(settings.deploy_dir)
    limits = limits or config.limits
    workflows = load_workflows(settings.deploy_dir / "workflows")
    preflight = Preflight.load(settings.deploy_dir, settings.data, config)
    # A step pinned to a model the catalogue lacks cannot run: said now, refused per task by the estimate.
    for problem in preflight.check(workflows):
        bus.log.warning("workflow_cannot_run", problem=problem)
    attempts = AttemptCounter(limits.attempts_per_day, clock)
    planner = Planner(bus, workflows, max_fanout, limits, preflight, attempts)
    delivery_limit = DeliveryLimit(bus, MAX_DELIVER, planner.earlier_runs)
    keep_alive = KeepAlive(bus, ack_wait_s)
    slots = asyncio.Semaphore(max_in_flight)
    running: set[asyncio.Task[None]] = set()
    scheduling: list[asyncio.Task[None]] = []

    @app.on_startup
    async def open_attempts() -> None:
        # After Bus.app's start-up hook (hooks run in order): connected, before any task is pulled.
        await attempts.open(bus)

    @app.on_startup
    async def follow_delivery_limit() -> None:
        await delivery_limit.start()

    @app.after_startup
    async def start_scheduler() -> None:
        scheduler = Scheduler(bus, clock, schedule_tick_s)
        scheduling.append(asyncio.create_task(scheduler.run()))

    # Every delivery of each task running here, by (tenant, id), the first one first. JetStream delivers a
    # message again while its run goes on when a mark came too late or a consumer's new leader lost its
    # latest deliveries: the run in progress answers for them all, so the task never runs twice at once.
    deliveries: dict[tuple[str, str], list[Msg]] = {}

    async def run(msg: Msg, task: Task) -> None:
        key = (task.tenant, task.id)
        keep_alive.hold(msg)
        try:
            kind = await planner.run(task, (msg.headers or {}).get(HEADER_SCHEDULE_RUN, ""))
            for delivery in deliveries[key]:
                await delivery.ack()
            bus.log.info("task_finished", task_id=task.id, kind=kind)
        except Exception as exc:
            # Infrastructure trouble (e.g. events could not be published): delivered again, up to the limit.
            bus.log.exception("task_crashed", task_id=task.id)
            await delivery_limit.crashed(deliveries[key][-1], task, exc)
        finally:
            for delivery in deliveries.pop(key):
                keep_alive.release(delivery)
            slots.release()

    async def submit(msg: Msg) -> None:
        task = await bus.decode(msg, Task)
        if task is not None:
            try:
                token(task.id)
                token(task.tenant)
                submitted_as = Subjects.tenant_of(msg.subject)
                if task.tenant != submitted_as:
                    raise ValueError(
                        f"the task names tenant {task.tenant!r} but was submitted as {submitted_as!r} "
                        "(a task runs as the tenant whose subject its submitter may publish on)"
                    )
            except ValueError as exc:
                await bus.dead_letter(msg.subject, msg.data, msg.headers, f"Task: {exc}")
                task = None
        if task is None:
            # Dead-lettered with the reason; acked so it is not redelivered.
            await msg.ack()
            return
        key = (task.tenant, task.id)
        if key in deliveries:
            deliveries[key].append(msg)
            keep_alive.hold(msg)
            bus.log.warning("task_delivered_while_running", task_id=task.id)
            return
        deliveries[key] = [msg]
        # A full replica waits here, on the consumer's callback: it asks for no more tasks meanwhile.
        await slots.acquire()
        background = asyncio.create_task(run(msg, task))
        running.add(background)
        background.add_done_callback(running.discard)

    tasks = bus.consume(
        stream=settings.subjects.stream(STREAM_TASKS),
        subject=settings.subjects.task_submit_all,
        durable=DURABLE_PLANNER,
        window=pull_window,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=MAX_DELIVER,
            max_ack_pending=MAX_ACK_PENDING,
        ),
        handle=submit,
    )

    @app.after_startup
    async def take_tasks() -> None:
        keep_alive.start()
        await tasks.start()

    @app.on_shutdown
    async def abandon_running() -> None:
        await tasks.stop()
        await keep_alive.stop()
        await delivery_limit.stop()
        for scheduler in scheduling:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
        # Unacked, these tasks go back to the stream and another replica picks them up.
        for background in list(running):
            background.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    return app
