"""Pacing's throttle: a token bucket per tenant that spaces out the paid calls of a tenant whose
pace signal says "throttle".

Each router replica keeps its own buckets, so the mesh-wide rate of a throttled tenant is the
per-replica rate times the replicas; pacing acts well before a cap (the caps and reservations are
what hold the line), so an approximate rate is enough and needs no shared state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# A throttled tenant still makes progress, about one paid call every half second per replica,
# with a short burst so that a step's parallel group is not serialised from its first call.
DEFAULT_RATE_PER_S = 2.0
DEFAULT_BURST = 2


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class Throttle:
    rate_per_s: float = DEFAULT_RATE_PER_S
    burst: int = DEFAULT_BURST
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError(f"throttle needs rate_per_s > 0 and burst >= 1, not {self.rate_per_s}, {self.burst}")

    def take(self, tenant: str, within_s: float) -> float | None:
        """Take the tenant's next slot: the seconds to wait for it, or None (nothing taken) when
        that is more than ``within_s``. Tokens may go negative: each one below zero is a caller
        already queued, so waits are handed out in arrival order without a lock."""
        now = time.monotonic()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(tokens=float(self.burst), stamp=now)
        tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate_per_s) - 1
        wait_s = max(0.0, -tokens / self.rate_per_s)
        if wait_s > within_s:
            return None
        bucket.tokens, bucket.stamp = tokens, now
        return wait_s
