"""JSON logs through structlog; bind ``task_id`` and ``call_id`` where they are known.

No secret reaches a log line: ``scrub_secrets`` runs ``services.runtime.scrub.scrub`` on every value
of every structlog event (after the traceback is rendered, so an exception's text is scrubbed too),
and ``ScrubFilter`` does the same for the standard-library records (FastStream's) on the root
logger's handlers.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

from services.runtime.scrub import scrub

# Values the JSON renderer writes as they are: nothing in them to scrub.
_PLAIN = (int, float, bool, type(None))


def _scrubbed(value: object) -> object:
    """``value`` with its secrets scrubbed; an object is replaced by its scrubbed repr only when that holds one."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    text = repr(value)
    scrubbed = scrub(text)
    return value if scrubbed == text else scrubbed


def scrub_secrets(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """The structlog processor: every value of the event, scrubbed."""
    return {key: _scrubbed(value) for key, value in event.items()}


class ScrubFilter(logging.Filter):
    """Scrubs a standard-library record's message and traceback before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and not record.exc_text:
            # What Formatter.format would render, rendered now so that it can be scrubbed.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def configure(service: str, level: str = "WARNING") -> structlog.stdlib.BoundLogger:
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_secrets,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logger: structlog.stdlib.BoundLogger = structlog.get_logger().bind(service=service)
    return logger
