"""The report of a gateway replay (loadtest/gateway_replay.py): what each request got, summed up
beside what the recorded run got, and the zero-loss check.

Zero loss: every request sent got a complete answer (any status: a 429 is an answer; a time-out, a
dropped connection or a stream cut short before ``[DONE]`` is not), and, when ClickHouse was asked,
every call id the answers named has exactly one usage row (``usage_events FINAL``). The one
exception is a 504 that says the call's deadline passed before it was sent: that call has no row
(nothing was spent; services/router/metering.py), while one whose deadline passed in flight has one.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from loadtest.gateway_traffic import GatewayTraffic
from loadtest.stats import Percentiles, percentiles

MAX_REASONS = 5
NO_ANSWER = "no answer"
# The message of services/router/metering.py's ``expired``: such a call was never sent, so has no row.
NOT_SENT = "deadline passed before the call was sent"


@dataclass
class Served:
    """What one replayed request got."""

    stream: bool
    answered: bool = False  # a complete answer: a whole body, or a stream ended by [DONE] or an error event
    status: int | None = None  # None: no HTTP answer at all
    problem: str = ""  # why it is not ok: the error, the time-out, the connection failure
    latency_ms: float | None = None  # send to last byte
    ttft_ms: float | None = None  # streams: send to first body byte
    call_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_usd: float = 0.0
    cache_hit: bool = False

    @property
    def ok(self) -> bool:
        return self.answered and self.status == 200 and not self.problem

    @property
    def metered(self) -> bool:
        """Whether its call (if it names one) must have a usage row."""
        return self.call_id is not None and not (self.status == 504 and NOT_SENT in self.problem)


@dataclass(frozen=True)
class GatewayZeroLoss:
    sent: int
    answered: int
    missing: int
    calls_reported: int  # distinct call ids the answers named
    # None: ClickHouse was not asked (no URL known).
    usage_rows: int | None
    calls_without_row: int | None  # calls never sent excepted (module docstring)
    calls_with_extra_rows: int | None

    @property
    def ok(self) -> bool:
        return self.missing == 0 and not self.calls_without_row and not self.calls_with_extra_rows


@dataclass(frozen=True)
class GatewayReport:
    requests: int  # in the recording, after --limit / --duration, less the skipped
    skipped: dict[str, int]
    sent: int
    streamed: int
    statuses: dict[str, int]  # replayed, by HTTP status ("no answer": none came)
    recorded_statuses: dict[str, int]
    not_ok_reasons: dict[str, int]
    wall_s: float
    offered_per_s: float
    throughput_per_s: float
    latency_ms: Percentiles  # ok answers, send to last byte
    ttft_ms: Percentiles  # ok streams, send to first body byte
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    recorded_input_tokens: int
    recorded_output_tokens: int
    cache_hits: int
    spend_usd: float
    recorded_spend_usd: float
    zero_loss: GatewayZeroLoss

    def to_json(self) -> dict:
        data = asdict(self)
        data["zero_loss"]["ok"] = self.zero_loss.ok
        return data


def build_report(
    traffic: GatewayTraffic,
    served: Sequence[Served],
    rows: dict[str, int] | None,
    *,
    span_s: float,
    wall_s: float,
) -> GatewayReport:
    """``rows``: usage rows per call id (None: ClickHouse not asked)."""
    requests = traffic.requests
    statuses: collections.Counter[str] = collections.Counter(
        str(s.status) if s.status is not None else NO_ANSWER for s in served
    )
    reasons: collections.Counter[str] = collections.Counter(s.problem for s in served if s.problem)
    ok = [s for s in served if s.ok]
    calls = {s.call_id: s for s in served if s.call_id}
    answered = sum(s.answered for s in served)
    if rows is None:
        without = extra = None
    else:
        without = sum(1 for call_id, s in calls.items() if rows.get(call_id, 0) == 0 and s.metered)
        extra = sum(1 for call_id in calls if rows.get(call_id, 0) > 1)
    return GatewayReport(
        requests=len(requests),
        skipped=traffic.skipped,
        sent=len(served),
        streamed=sum(s.stream for s in served),
        statuses=dict(sorted(statuses.items())),
        recorded_statuses=dict(sorted(collections.Counter(str(r.status) for r in requests).items())),
        not_ok_reasons=dict(reasons.most_common(MAX_REASONS)),
        wall_s=wall_s,
        offered_per_s=len(served) / span_s if span_s > 0 else float(len(served)),
        throughput_per_s=answered / wall_s,
        latency_ms=percentiles([s.latency_ms for s in ok if s.latency_ms is not None]),
        ttft_ms=percentiles([s.ttft_ms for s in ok if s.stream and s.ttft_ms is not None]),
        input_tokens=sum(s.input_tokens for s in served),
        output_tokens=sum(s.output_tokens for s in served),
        cached_input_tokens=sum(s.cached_input_tokens for s in served),
        recorded_input_tokens=sum(r.input_tokens for r in requests),
        recorded_output_tokens=sum(r.output_tokens for r in requests),
        cache_hits=sum(s.cache_hit for s in served),
        spend_usd=sum(s.cost_usd for s in served),
        recorded_spend_usd=sum(r.cost_usd for r in requests),
        zero_loss=GatewayZeroLoss(
            sent=len(served),
            answered=answered,
            missing=len(served) - answered,
            calls_reported=len(calls),
            usage_rows=sum(rows.get(call_id, 0) for call_id in calls) if rows is not None else None,
            calls_without_row=without,
            calls_with_extra_rows=extra,
        ),
    )


def print_gateway_report(report: GatewayReport, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"loadtest replay (gateway): {name}")
    table.add_column("figure")
    for column in ("n", "p50", "p95", "p99", "max"):
        table.add_column(column, justify="right")
    for label, p in (("latency, ms", report.latency_ms), ("time to first byte (streams), ms", report.ttft_ms)):
        values = (f"{v:.1f}" if v is not None else "-" for v in (p.p50, p.p95, p.p99, p.max))
        table.add_row(label, str(p.n), *values)
    console.print(table)
    skipped = ", ".join(f"{n} {why}" for why, n in report.skipped.items())
    console.print(
        f"{report.sent} requests sent ({report.streamed} streamed) of {report.requests} recorded"
        + (f"; skipped {skipped}" if skipped else ""),
        markup=False,
    )
    replayed = ", ".join(f"{n} x {status}" for status, n in report.statuses.items())
    recorded = ", ".join(f"{n} x {status}" for status, n in report.recorded_statuses.items())
    console.print(f"statuses: {replayed or 'none'} (recorded: {recorded or 'none'})", markup=False)
    for reason, n in report.not_ok_reasons.items():
        console.print(f"  {n} x {reason}", markup=False)
    console.print(
        f"throughput {report.throughput_per_s:.1f}/s (offered {report.offered_per_s:.1f}/s) over {report.wall_s:.1f}s; "
        f"tokens in {report.input_tokens:,} (cached {report.cached_input_tokens:,}), out {report.output_tokens:,} "
        f"(recorded {report.recorded_input_tokens:,} / {report.recorded_output_tokens:,}); "
        f"{report.cache_hits} cache hits; spend ${report.spend_usd:.4f} (recorded ${report.recorded_spend_usd:.4f})"
    )
    z = report.zero_loss
    verdict = "[green]zero loss[/green]" if z.ok else "[red]LOSS[/red]"
    if z.usage_rows is None:
        rows = "usage rows not checked (no ClickHouse URL: --clickhouse)"
    else:
        rows = (
            f"{z.usage_rows} usage rows for {z.calls_reported} calls "
            f"({z.calls_without_row} without a row, {z.calls_with_extra_rows} with more than one)"
        )
    console.print(f"{verdict}: {z.answered}/{z.sent} requests answered ({z.missing} missing); {rows}")
