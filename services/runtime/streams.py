"""The mesh's JetStream streams: what each keeps and for how long. Every service declares them
idempotently when it starts (``Bus.app``), so the first one up creates them and a changed
setting reaches an existing stream."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from schemas.messages import TERMINAL_EVENTS
from schemas.subjects import (
    STREAM_ARTIFACT_EVENTS,
    STREAM_CONTROL,
    STREAM_DLQ,
    STREAM_TASK_EVENTS,
    STREAM_TASKS,
    STREAM_USAGE,
    Subjects,
)

DAY_S = 24 * 3600.0
# A resubmitted task, or a re-published usage event, with the same Nats-Msg-Id is dropped inside this window.
DEDUPE_WINDOW_S = 600.0


def stream_configs(subjects: Subjects) -> list[StreamConfig]:
    """The JetStream streams of the mesh."""
    return [
        StreamConfig(
            name=subjects.stream(STREAM_TASKS),
            subjects=[subjects.task_submit],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=DEDUPE_WINDOW_S,
            storage=StorageType.FILE,
        ),
        StreamConfig(
            name=subjects.stream(STREAM_TASK_EVENTS),
            # A task's end, with its history; its progress events are live only (core NATS).
            subjects=subjects.task_endings(TERMINAL_EVENTS),
            max_age=7 * DAY_S,
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


async def ensure_streams(js: JetStreamContext, subjects: Subjects) -> None:
    """Create each mesh stream, or update it to the configuration above."""
    for config in stream_configs(subjects):
        await ensure_stream(js, config)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config=config)
    except BadRequestError:
        await js.update_stream(config=config)
