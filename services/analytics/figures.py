"""The report's plots, drawn with matplotlib (Agg, no display) into PNG bytes.

Each function takes query results (``data.Result``) and returns the PNG, or None when there is
nothing to draw: the report then says "no data yet" for that figure instead of an empty axis.
Money is USD; times are UTC.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402  (after the backend is chosen)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from services.analytics.data import ReportWindow, Result  # noqa: E402

LEVELS = ("p50", "p95", "p99")


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _time_axis(axis: Any, times: list[datetime] | None = None, bucket_s: int = 3600, bars: bool = False) -> None:
    """Concise UTC dates; with ``times``, the axis spans them (a single point would otherwise get
    matplotlib's default span of years): bars drawn from their bucket's start get one more bucket,
    points half a bucket either side."""
    if times:
        bucket = timedelta(seconds=bucket_s)
        axis.set_xlim(
            *((min(times), max(times) + bucket) if bars else (min(times) - bucket / 2, max(times) + bucket / 2))
        )
    axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(axis.xaxis.get_major_locator()))


def _stack(axis: Any, rows: list[dict[str, Any]], by: str, bucket_s: int) -> None:
    """Bars of spend per bucket, stacked by ``by`` (largest total at the bottom)."""
    totals: dict[str, float] = defaultdict(float)
    cells: dict[tuple[datetime, str], float] = defaultdict(float)
    for row in rows:
        totals[row[by]] += float(row["cost_usd"])
        cells[(row["bucket"], row[by])] += float(row["cost_usd"])
    buckets = sorted({bucket for bucket, _ in cells})
    bottom = [0.0] * len(buckets)
    width = bucket_s / 86_400 * 0.9
    for name in sorted(totals, key=lambda n: -totals[n])[:12]:
        heights = [cells.get((b, name), 0.0) for b in buckets]
        axis.bar(buckets, heights, width=width, bottom=bottom, label=name or "(none)", align="edge")
        bottom = [a + b for a, b in zip(bottom, heights, strict=True)]
    axis.set_ylabel("USD")
    axis.set_title(f"by {by}")
    axis.legend(fontsize=7, loc="upper left")
    _time_axis(axis, buckets, bucket_s, bars=True)


def spend_over_time(result: Result, bucket_s: int) -> bytes | None:
    rows = result.dicts()
    if not rows:
        return None
    figure, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for axis, by in zip(axes, ("tenant", "model", "tier"), strict=True):
        _stack(axis, rows, by, bucket_s)
    return png(figure)


def savings(result: Result, frontier_model: str, bucket_s: int) -> bytes | None:
    """The window's totals side by side, and (over more than one bucket) both spends accumulating."""
    rows = result.dicts()
    if not rows:
        return None
    times = [row["bucket"] for row in rows]
    actual = _cumulative(float(row["actual_usd"]) for row in rows)
    frontier = _cumulative(float(row["frontier_only_usd"]) for row in rows)
    saved = frontier[-1] - actual[-1]
    share = saved / frontier[-1] if frontier[-1] else 0.0
    over_time = len(rows) > 1
    figure, axes = plt.subplots(1, 2 if over_time else 1, figsize=(11 if over_time else 6, 4), squeeze=False,
                                width_ratios=[1, 2.5] if over_time else None)  # fmt: skip
    totals = axes[0][0]
    labels = [f"frontier only\n({frontier_model})", "the mesh,\nas routed"]
    bars = totals.bar(labels, [frontier[-1], actual[-1]], color=["tab:red", "tab:green"])
    totals.bar_label(bars, fmt="$%.4f", fontsize=8)
    totals.set_ylabel("USD in the window")
    totals.set_title(f"${saved:,.4f} saved ({share:.1%} below frontier only)", fontsize=10)
    if over_time:
        axis = axes[0][1]
        axis.plot(times, frontier, marker=".", label="frontier only", color="tab:red")
        axis.plot(times, actual, marker=".", label="the mesh, as routed", color="tab:green")
        axis.fill_between(times, actual, frontier, color="tab:green", alpha=0.15)
        axis.set_ylabel("USD, cumulative")
        axis.legend(fontsize=8)
        _time_axis(axis, times, bucket_s)
    return png(figure)


def _cumulative(values: Iterable[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def pacing(result: Result, window: ReportWindow, caps: dict[str, float]) -> bytes | None:
    """Month-to-date spend per scope (every tenant with spend, and the whole mesh when it has a month
    cap), with the pacing curve (cap * elapsed share of the month) and the cap where one is set."""
    rows = result.dicts()
    if not rows:
        return None
    series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for row in rows:
        series[row["tenant"]].append((row["hour"], float(row["cost_usd"])))
        series["*"].append((row["hour"], float(row["cost_usd"])))
    if "*" not in caps or window.tenant:
        del series["*"]
    scopes = sorted(series, key=lambda s: (s != "*", s))[:9]
    columns = min(3, len(scopes))
    lines = math.ceil(len(scopes) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines), squeeze=False)
    start, end = window.month_start, window.month_end
    for axis, scope in zip(axes.flat, scopes, strict=False):
        points = sorted(series[scope])
        hours = [start] + [h for h, _ in _merge(points)]
        spend = [0.0] + _cumulative(v for _, v in _merge(points))
        axis.step(hours, spend, where="post", label="month to date", color="tab:blue")
        cap = caps.get(scope)
        if cap is not None:
            axis.plot([start, end], [0, cap], linestyle="--", color="tab:orange", label="pacing curve")
            axis.axhline(cap, color="tab:red", linewidth=1, label=f"cap ${cap:,.2f}")
        axis.set_xlim(start, end)
        axis.set_title(
            "whole mesh (global cap)" if scope == "*" else f"tenant {scope}" + ("" if cap else ": no month cap")
        )
        axis.legend(fontsize=7)
        _time_axis(axis)
    for axis in list(axes.flat)[len(scopes) :]:
        axis.set_visible(False)
    return png(figure)


def _merge(points: list[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    merged: dict[datetime, float] = defaultdict(float)
    for hour, value in points:
        merged[hour] += value
    return sorted(merged.items())


def latency(result: Result) -> bytes | None:
    rows = result.dicts()
    if not rows:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    models = [row["model"] for row in rows]
    for axis, column, title in zip(axes, ("latency_ms", "ttft_ms"), ("latency", "time to first token"), strict=True):
        width = 0.25
        measured = False
        for i, level in enumerate(LEVELS):
            values = [_finite(row[column][i]) if row[column] else 0.0 for row in rows]
            measured = measured or any(values)
            axis.bar([m + (i - 1) * width for m in range(len(models))], values, width=width, label=level)
        axis.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
        axis.set_ylabel("ms")
        axis.set_title(title if measured else f"{title}: not measured (no streamed calls)")
        axis.legend(fontsize=8)
    return png(figure)


def _finite(value: float) -> float:
    return value if value == value and not math.isinf(value) else 0.0


def cache(result: Result, bucket_s: int) -> bytes | None:
    rows = result.dicts()
    if not rows:
        return None
    times = [row["bucket"] for row in rows]
    figure, axis = plt.subplots(figsize=(10, 3.5))
    axis.plot(times, [row["exact_cache_hit_share"] for row in rows], marker="o", label="exact-match cache hits / calls")
    axis.plot(
        times, [row["engine_cached_prompt_share"] for row in rows], marker="s",
        label="engine-cached prompt tokens / prompt tokens",
    )  # fmt: skip
    axis.set_ylim(0, 1)
    axis.set_ylabel("share")
    axis.legend(fontsize=8)
    _time_axis(axis, times, bucket_s)
    return png(figure)


def defences(result: Result) -> bytes | None:
    rows = result.dicts()
    if not rows:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for axis, unit in zip(axes, ("calls", "tasks"), strict=True):
        mine = [row for row in rows if row["unit"] == unit]
        axis.barh([row["layer"] for row in mine], [row["n"] for row in mine], color="tab:purple")
        axis.set_title(f"{unit} stopped, by defence layer" if mine else f"no {unit} stopped")
        axis.set_xlabel(unit)
    return png(figure)


def artifact_cost(result: Result) -> bytes | None:
    rows = [row for row in result.dicts() if row["completed"]]
    if not rows:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for axis, by in zip(axes, ("workflow", "artifact type"), strict=True):
        mine = [row for row in rows if row["by"] == by]
        names = [row["name"] or "(none)" for row in mine]
        positions = range(len(mine))
        axis.bar([p - 0.2 for p in positions], [float(r["usd_per_completed_artifact"]) for r in mine], width=0.4,
                 label="all tasks' spend / completed")  # fmt: skip
        axis.bar([p + 0.2 for p in positions], [float(r["usd_per_completed_task"]) for r in mine], width=0.4,
                 label="completed tasks only")  # fmt: skip
        axis.set_xticks(list(positions), names, rotation=15, fontsize=8)
        axis.set_ylabel("USD per completed artifact")
        axis.set_title(f"by {by}")
        axis.legend(fontsize=7)
    return png(figure)


def token_multiplier(result: Result) -> bytes | None:
    rows = result.dicts()
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(10, 3.5))
    names = [row["workflow"] for row in rows]
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [row["tokens_per_task"] for row in rows], width=0.4, label="tokens per task")
    axis.bar([p + 0.2 for p in positions], [row["single_call_tokens"] for row in rows], width=0.4,
             label="largest single call")  # fmt: skip
    for p, row in zip(positions, rows, strict=True):
        axis.annotate(f"{row['multiplier']:.1f}x", (p, row["tokens_per_task"]), ha="center", va="bottom", fontsize=9)
    axis.set_xticks(list(positions), names)
    axis.set_ylabel("tokens (mean per task)")
    axis.legend(fontsize=8)
    return png(figure)


def costliest_tasks(tasks: Result, calls: Result) -> bytes | None:
    """One bar per task (costliest at the top), split by step: where each task's money went."""
    if not tasks.rows:
        return None
    per_step: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for call in calls.dicts():
        per_step[call["task_id"]][call["step_id"] or "(no step)"] += float(call["cost_usd"])
    ids = [row["task_id"] for row in tasks.dicts()][::-1]
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(ids) + 1.5))
    colours: dict[str, Any] = {}
    palette = plt.get_cmap("tab20")
    for y, task in enumerate(ids):
        left = 0.0
        for step, cost in sorted(per_step[task].items()):
            colour = colours.setdefault(step, palette(len(colours) % 20))
            axis.barh(y, cost, left=left, color=colour)
            left += cost
    axis.set_yticks(range(len(ids)), [t[:28] for t in ids], fontsize=7)
    axis.set_xlabel("USD, split by step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axis.legend(handles, list(colours), fontsize=7, loc="lower right")
    return png(figure)


def anomalies(result: Result) -> bytes | None:
    rows = result.dicts()
    if not rows:
        return None
    scopes = sorted({(row["scope"], row["key"]) for row in rows}, key=lambda s: (s[0] != "tenant", s[1]))
    flagged = {(row["scope"], row["key"]) for row in rows if row["anomaly"]}
    shown = [s for s in scopes if s in flagged][:6] or scopes[:6]
    figure, axes = plt.subplots(len(shown), 1, figsize=(10, 2.2 * len(shown) + 0.5), squeeze=False)
    for axis, (scope, key) in zip(axes.flat, shown, strict=True):
        mine = [row for row in rows if row["scope"] == scope and row["key"] == key]
        hours = [row["hour"] for row in mine]
        mean = [_finite(row["band_mean"]) for row in mine]
        sd = [_finite(row["band_sd"]) for row in mine]
        axis.fill_between(hours, [m - 3 * s for m, s in zip(mean, sd, strict=True)],
                          [m + 3 * s for m, s in zip(mean, sd, strict=True)], color="tab:gray", alpha=0.25,
                          label="usual band (trailing 24 h, mean ± 3 sd)", step="mid")  # fmt: skip
        axis.plot(hours, [row["cost_usd"] for row in mine], marker=".", color="tab:blue", label="hourly spend")
        odd = [row for row in mine if row["anomaly"]]
        axis.scatter([row["hour"] for row in odd], [row["cost_usd"] for row in odd], color="tab:red", zorder=3,
                     label="outside the band")  # fmt: skip
        axis.set_title(f"{scope} {key}", fontsize=9)
        axis.set_ylabel("USD / hour")
        axis.legend(fontsize=7, loc="upper left")
        _time_axis(axis, hours)
    return png(figure)
