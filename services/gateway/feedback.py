"""``POST /v1/feedback``: a caller's verdict on an answer the gateway gave it.

Body (JSON): ``call_id`` (the ``x-frugalmesh-call-id`` header, or the completion's ``id``,
``chatcmpl-<call id>``) or ``task_id``; ``score`` (0 to 1) or ``correct`` (true/false); optional
``source`` (user, the default, validator or judge), ``tag`` and ``comment``. The tenant is the
virtual key's, never the body's, so a key can only judge its own tenant's calls. Answered 202
with the verdict's id once JetStream stored it; the accountant then stores it in ClickHouse.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import JSONResponse

from schemas.messages import MAX_ID, Id, Text
from services.gateway.errors import invalid
from services.gateway.translate import completion_id
from services.runtime.bus import Bus
from services.runtime.feedback import new_feedback, publish_feedback

COMPLETION_PREFIX = completion_id("")


class FeedbackBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body, with ``Feedback``'s bounds: a field past them is a 400 naming it, not a verdict the
    accountant would dead-letter after the caller was told 202."""

    call_id: Annotated[str, Meta(max_length=len(COMPLETION_PREFIX) + MAX_ID)] = ""  # checked again unprefixed
    task_id: Id = ""
    score: float | None = None
    correct: bool | None = None
    # A caller cannot claim recorded labels ("label"): those come from replays.
    source: Literal["user", "validator", "judge"] = "user"
    tag: Id = ""
    comment: Text = ""


async def accept_feedback(bus: Bus, tenant: str, request: Request) -> JSONResponse:
    """Decode, check and publish one verdict; GatewayError (400) for a body that says nothing usable."""
    try:
        body = msgspec.json.decode(await request.body(), type=FeedbackBody)
    except (msgspec.DecodeError, RecursionError) as exc:  # nesting past Python's stack raises the latter
        raise invalid(f"feedback body: {exc}") from None
    if (body.score is None) == (body.correct is None):
        raise invalid("give exactly one of score (0 to 1) and correct (true or false)", "score")
    score = body.score if body.score is not None else float(bool(body.correct))
    call_id = body.call_id.removeprefix(COMPLETION_PREFIX)
    if len(call_id) > MAX_ID:
        raise invalid(f"call_id is longer than {MAX_ID} characters", "call_id")
    try:
        feedback = new_feedback(
            tenant=tenant,
            score=score,
            source=body.source,
            call_id=call_id,
            task_id=body.task_id,
            tag=body.tag,
            comment=body.comment,
        )
    except ValueError as exc:
        raise invalid(str(exc), "score" if "score" in str(exc) else "call_id") from None
    await publish_feedback(bus, feedback)
    return JSONResponse({"id": feedback.feedback_id, "object": "feedback"}, status_code=202)
