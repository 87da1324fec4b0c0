"""Layer 5, pacing: a tenant's month cap spread over the month as a spend curve.

The curve is linear in elapsed time: at a moment ``t`` of a UTC month it allows
``cap * (t - month start) / (month length)``. A tenant whose month-to-date settled spend runs
ahead of the curve by more than ``downgrade_ahead * cap`` gets PaceSignal "downgrade" (the
router takes a cheaper tier), by more than ``throttle_ahead * cap`` "throttle"; within
``downgrade_ahead * cap`` of the curve, or behind it, "normal". Measuring the lead in fractions
of the whole cap keeps the first hours of a month from flapping (the curve is near zero there,
so any ratio to it would be huge).
"""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.messages import PaceAction
from services.accountant.budget import PacingConfig


def month_bounds(time_ms: int) -> tuple[int, int]:
    """Start and end (ms since the epoch) of the UTC month holding ``time_ms``."""
    now = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def curve(month_cap: int, time_ms: int) -> int:
    """What the month's budget allows spent by ``time_ms`` (same unit as ``month_cap``)."""
    start, end = month_bounds(time_ms)
    return month_cap * (time_ms - start) // (end - start)


def pace_action(spend: int, month_cap: int, time_ms: int, config: PacingConfig) -> PaceAction:
    ahead = spend - curve(month_cap, time_ms)
    if ahead > config.throttle_ahead * month_cap:
        return "throttle"
    if ahead > config.downgrade_ahead * month_cap:
        return "downgrade"
    return "normal"
