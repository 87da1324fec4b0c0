"""A JetStream publish sent until it is stored, behind ``Bus.publish`` and ``Bus.publish_usage``.

"No responders" (the stream has no leader: a cluster electing one after a server was lost, seconds)
means nothing was stored, so any publish may be sent again. A late acknowledgement may mean the
message was stored: only a publish with a Nats-Msg-Id (the stream drops the repeat) is sent again
then (``resend_late``).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

# Between tries while the stream has no leader ("no responders" comes back at once).
ELECTION_RETRY_S = 0.25


async def publish_until_stored(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    *,
    stream: str,
    headers: dict[str, str] | None,
    retry_s: float,
    resend_late: bool,
    log: structlog.stdlib.BoundLogger,
) -> None:
    """Publish ``data`` and wait for its acknowledgement, sending it again for up to ``retry_s``;
    raises the last error after that."""
    give_up = time.monotonic() + retry_s
    while True:
        try:
            await js.publish(subject, data, stream=stream, headers=headers)
            return
        except NoStreamResponseError:
            if time.monotonic() > give_up:
                raise
            log.warning("publish_no_stream_leader", subject=subject)
            await asyncio.sleep(ELECTION_RETRY_S)
        except NatsTimeoutError:
            if not resend_late or time.monotonic() > give_up:
                raise
            log.warning("publish_late", subject=subject)
