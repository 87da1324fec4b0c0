"""A JetStream publish sent again while its stream has no leader, behind ``Bus.publish``.

"No responders" (the stream has no leader: a cluster electing one after a server was lost, seconds)
means nothing was stored, so any publish may be sent again. A late acknowledgement may mean the
message was stored, so it is raised to the caller (usage events and settles then wait in the
outbox, services/runtime/outbox.py, which sends them again under their Nats-Msg-Id).
"""

from __future__ import annotations

import asyncio
import time

import structlog
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
