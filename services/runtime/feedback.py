"""Sending a verdict on a call's answer (``schemas.messages.Feedback``) to ``mesh.feedback.<tenant>``.

One way for every sender (the gateway's ``POST /v1/feedback``, ``frugalmesh feedback``, a shadow
call's judge): JetStream stream FEEDBACK, de-duplicated on the feedback's id, from which the
accountant's ingest stores it in ClickHouse (table ``feedback``, view ``call_feedback``), as it
stores usage. A verdict is a fact about a call, so it is kept whatever the call cost.
"""

from __future__ import annotations

import uuid

from schemas.messages import Feedback, FeedbackSource
from schemas.subjects import HEADER_MSG_ID, STREAM_FEEDBACK
from services.runtime.bus import Bus, now_ms


def new_feedback(
    *,
    tenant: str,
    score: float,
    source: FeedbackSource,
    call_id: str = "",
    task_id: str = "",
    tag: str = "",
    comment: str = "",
) -> Feedback:
    """A verdict with a fresh id and the current time; ValueError when it judges nothing or its score
    is not a share."""
    if not (call_id or task_id):
        raise ValueError("feedback judges a call or a task: give a call_id or a task_id")
    if not 0 <= score <= 1:
        raise ValueError(f"a score is between 0 (wrong) and 1 (right), not {score}")
    return Feedback(
        feedback_id=uuid.uuid4().hex,
        time_ms=now_ms(),
        tenant=tenant,
        call_id=call_id,
        task_id=task_id,
        score=score,
        source=source,
        tag=tag,
        comment=comment,
    )


async def publish_feedback(bus: Bus, feedback: Feedback) -> None:
    """Store the verdict in JetStream (waits for its acknowledgement)."""
    await bus.publish(
        bus.subjects.feedback(feedback.tenant),
        feedback,
        stream=bus.subjects.stream(STREAM_FEEDBACK),
        headers={HEADER_MSG_ID: feedback.feedback_id},
    )
