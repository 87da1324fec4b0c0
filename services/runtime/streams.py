"""The mesh's JetStream streams: what each keeps and for how long. Every service declares them
idempotently when it starts (``Bus.app``), so the first one up creates them and a changed
setting reaches an existing stream.

Replication (``MeshSettings.replicas``, FRUGALMESH_REPLICAS) is part of that configuration: every
stream, and the stream under every KV bucket (``KV_<bucket>``) and object store (``OBJ_<bucket>``),
is declared with it, and one found with another count is updated to it (JetStream moves the copies
itself). A count above the cluster's size is refused by the server; the error says so.
"""

from __future__ import annotations

from collections.abc import Collection

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from schemas.messages import TERMINAL_EVENTS
from schemas.subjects import (
    STREAM_ALERTS,
    STREAM_ARTIFACT_EVENTS,
    STREAM_CONTROL,
    STREAM_DLQ,
    STREAM_FEEDBACK,
    STREAM_TASK_EVENTS,
    STREAM_TASKS,
    STREAM_USAGE,
    Subjects,
)

DAY_S = 24 * 3600.0
# A resubmitted task, or a re-published usage event, with the same Nats-Msg-Id is dropped inside this window.
DEDUPE_WINDOW_S = 600.0


def stream_configs(subjects: Subjects, replicas: int = 1) -> list[StreamConfig]:
    """The JetStream streams of the mesh, each kept in ``replicas`` copies."""
    configs = [
        StreamConfig(
            name=subjects.stream(STREAM_TASKS),
            subjects=[subjects.task_submit_all],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=DEDUPE_WINDOW_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_TASK_EVENTS),
            # A task's end, with its history; its progress events are live only (core NATS).
            subjects=subjects.task_endings(TERMINAL_EVENTS),
            max_age=7 * DAY_S,
            # A follower reads a task's ending by subject (Bus.last_stored), as its tenant may.
            allow_direct=True,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_USAGE),
            subjects=[subjects.usage_all],
            max_age=7 * DAY_S,
            # Dedupe on Nats-Msg-Id = event id: a publisher's retry never makes a second row.
            duplicate_window=DEDUPE_WINDOW_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_CONTROL),
            subjects=[subjects.control_kill, subjects.control_pace, subjects.control_budget],
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
            name=subjects.stream(STREAM_ALERTS),
            subjects=[subjects.alert_all],
            max_age=30 * DAY_S,
            # Nats-Msg-Id = the alert's id: two accountants' sends of one alert store one message.
            duplicate_window=DEDUPE_WINDOW_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_FEEDBACK),
            subjects=[subjects.feedback_all],
            max_age=30 * DAY_S,
            # Nats-Msg-Id = the feedback's id: a client's retry stores one verdict.
            duplicate_window=DEDUPE_WINDOW_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_DLQ),
            subjects=[subjects.dlq_all],
            max_age=30 * DAY_S,
            storage=StorageType.FILE,
        ),
    ]
    for config in configs:
        config.num_replicas = replicas
    return configs


async def ensure_streams(
    js: JetStreamContext,
    subjects: Subjects,
    replicas: int = 1,
    *,
    only: Collection[str] | None = None,
    update: bool = True,
) -> None:
    """Create each mesh stream (of ``only``, when given) that is missing, and, when ``update``, bring an
    existing one to the configuration above."""
    for config in stream_configs(subjects, replicas):
        if only is None or config.name in only:
            await ensure_stream(js, config, update=update)


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool = True) -> None:
    try:
        await js.add_stream(config=config)
    except BadRequestError:  # it exists with another configuration
        if update:
            await js.update_stream(config=config)


async def ensure_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Give an existing stream (a bucket's) ``replicas`` copies, when it has another count."""
    try:
        config = (await js.stream_info(stream)).config
    except NotFoundError:
        return
    if (config.num_replicas or 1) != replicas:
        config.num_replicas = replicas
        await js.update_stream(config=config)
