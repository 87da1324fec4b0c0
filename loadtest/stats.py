"""Percentiles for reports: nearest-rank, so every figure is a latency that was really observed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Percentiles:
    n: int
    # None when there was nothing to measure (JSON has no NaN).
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def percentiles(values: Sequence[float]) -> Percentiles:
    if not values:
        return Percentiles(n=0, p50=None, p95=None, p99=None, max=None)
    ordered = sorted(values)
    return Percentiles(
        n=len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        max=ordered[-1],
    )
