"""`frugalmesh report`: one self-contained HTML file of the mesh's economics, drawn from ClickHouse.

Self-contained means it opens offline and from an email attachment: the plots are PNGs inlined as
``data:`` URIs, the style and the one small script are inline, nothing is fetched. Every figure
carries the SQL that made it (with the parameter values it ran with), so an analyst can paste it
into `frugalmesh sql`. A figure without rows says "no data yet" and why, instead of drawing an
empty axis. The script only checks, on load, that every plot decoded (``naturalWidth > 0``) and
records the outcome and any script error on ``<body>`` (``data-plots-rendered``,
``data-script-errors``), which the headless-browser test reads back.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from services.analytics import figures, queries
from services.analytics.data import (
    ReportWindow,
    Result,
    bucket_seconds,
    fetch,
    frontier_prices,
    query_parameters,
    used_parameters,
)
from services.runtime.catalog import Catalog


@dataclass
class Section:
    key: str
    title: str
    explains: str
    results: list[Result]
    image: bytes | None
    no_data: str
    extra: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Caps:
    """Month caps in USD by scope (a tenant's name, ``*`` for the whole mesh) and where they came from."""

    month_usd: dict[str, float]
    source: str


def build(ch: Client, window: ReportWindow, catalog: Catalog, caps: Caps) -> str:
    """The report's HTML for ``window``, from the ClickHouse ``ch`` is connected to (its default database)."""
    frontier_model, prices = frontier_prices(catalog)
    span = fetch(ch, queries.SPAN, query_parameters(window, bucket_s=60, frontier=prices))
    first, last, calls, spent = span.rows[0] if span.rows else (None, None, 0, 0)
    bucket_s = bucket_seconds(first, last) if calls else 60
    parameters = query_parameters(window, bucket_s=bucket_s, frontier=prices)

    def run(query: queries.Query) -> Result:
        return fetch(ch, query, parameters)

    costliest = run(queries.COSTLIEST_TASKS)
    task_ids = [row[0] for row in costliest.rows]
    tree_parameters = {**parameters, "tasks": task_ids}
    trees = fetch(ch, queries.CALL_TREES, tree_parameters)
    workflows = fetch(ch, queries.TASK_WORKFLOWS, tree_parameters)
    anomalies = run(queries.ANOMALIES)
    spend = run(queries.SPEND_OVER_TIME)
    savings = run(queries.SAVINGS)
    month = run(queries.MONTH_TO_DATE)
    latency = run(queries.LATENCY)
    cache = run(queries.CACHE)
    defences = run(queries.DEFENCES)
    artifacts = run(queries.ARTIFACT_COST)
    multiplier = run(queries.TOKEN_MULTIPLIER)
    no_calls = "no calls in the window yet: run some tasks (`frugalmesh demo`) or widen --since"
    sections = [
        Section("spend", "Spend over time by tenant, model and tier", _EXPLAINS["spend"], [spend],
                figures.spend_over_time(spend, bucket_s), no_calls),
        Section("savings", "Savings against the frontier-only counterfactual",
                _EXPLAINS["savings"].format(model=frontier_model, prices=prices), [savings],
                figures.savings(savings, frontier_model, bucket_s), no_calls),
        Section("pacing", "Month-to-date spend against the pacing curve and cap",
                _EXPLAINS["pacing"] + f" Caps: {caps.source}.", [month],
                figures.pacing(month, window, caps.month_usd), "no spend this month yet"),
        Section("latency", "Latency and time to first token per model (p50, p95, p99)", _EXPLAINS["latency"],
                [latency], figures.latency(latency), "no call ran on a model in the window yet"),
        Section("cache", "Exact-cache hit share and engine-cached prompt share", _EXPLAINS["cache"], [cache],
                figures.cache(cache, bucket_s), no_calls),
        Section("defences", "Refusals, kills and time-outs by defence layer", _EXPLAINS["defences"], [defences],
                figures.defences(defences), "nothing was refused, killed or timed out in the window"),
        Section("artifacts", "Cost per completed artifact by workflow and artifact type", _EXPLAINS["artifacts"],
                [artifacts], figures.artifact_cost(artifacts), "no task completed in the window yet"),
        Section("tokens", "Tokens per task by workflow against a single call", _EXPLAINS["tokens"], [multiplier],
                figures.token_multiplier(multiplier), "no completed task with metered calls in the window yet"),
        Section("costliest", "The ten costliest tasks and their call trees", _EXPLAINS["costliest"],
                [costliest, trees, workflows], figures.costliest_tasks(costliest, trees), no_calls,
                extra=_call_trees(costliest, trees, workflows)),
        Section("anomalies", "Spend anomalies: hours outside a tenant's or key's usual band", _EXPLAINS["anomalies"],
                [anomalies], figures.anomalies(anomalies),
                "not enough hourly history yet: a band needs 6 earlier hours with spend for the same tenant or key",
                extra=_anomaly_table(anomalies)),
    ]  # fmt: skip
    for section in sections:
        section.parameters = tree_parameters
    return _page(window, sections, calls, float(spent or 0))


_EXPLAINS = {
    "spend": "What the calls of the window cost, per time bucket, stacked three ways. Cache hits, refusals "
    "and kills cost nothing; local models cost their hardware's amortised price (deploy/hardware.toml).",
    "savings": "Spend as routed (in total, and accumulating over the window), against the same calls priced "
    "on {model} (USD {prices[0]}/{prices[1]}/{prices[2]} per million input/cached input/output tokens) with "
    "their own token counts. "
    "Refused and killed calls count on neither side.",
    "pacing": "Each tenant's spend this UTC month, against the straight line from 0 to its month cap over the "
    "month (the accountant's pacing curve, services/accountant/pacing.py) and the cap itself. Ahead of the "
    "curve by 5% of the cap the router downgrades tiers, by 20% it throttles (deploy/budgets.toml [pacing]).",
    "latency": "Quantiles over the calls a model ran (ok, error, timeout, cancelled), from the per-minute "
    "t-digest states. Time to first token is measured on streamed calls only.",
    "cache": "Exact-match cache: calls the router answered from its cache, over all calls that were not "
    "refused. Engine prompt cache: prompt tokens the provider or engine had cached, over prompt tokens, on "
    "calls that ran.",
    "defences": "Calls stopped by a defence (time-out, kill switch, a cap's or pacing's refusal) and tasks that "
    "ended failed, partial or killed, by the layer their reason names.",
    "artifacts": "Left bar: all the spend of a workflow's ended tasks (failed ones included) over the "
    "artifacts it completed; right bar: the completed tasks' own cost. By artifact type: completed tasks.",
    "tokens": "Mean tokens (input + output) per completed task, against the task's largest single call; the "
    "label is the multiplier a multi-call workflow pays.",
    "costliest": "The ten tasks whose calls cost most, each bar split by step; below, each task's calls by step "
    "(model, tier, outcome, tokens, cost, latency).",
    "anomalies": "Hourly spend of each tenant and virtual key against the mean ± 3 standard deviations of its "
    "previous 24 hours with spend. Shown: the scopes with an hour outside the band (else the first few).",
}


def _call_trees(tasks: Result, calls: Result, workflows: Result) -> str:
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for call in calls.dicts():
        by_task[call["task_id"]][call["step_id"] or "(no step)"].append(call)
    ended = {row[0]: (row[1], row[2]) for row in workflows.rows}
    out = []
    for task in tasks.dicts():
        workflow, kind = ended.get(task["task_id"], ("?", "not ended"))
        steps = by_task[task["task_id"]]
        items = []
        for step, step_calls in steps.items():
            lines = "".join(
                f"<li>{_e(c['model'])} ({_e(c['tier'])}) {_e(c['outcome'])}: {c['input_tokens']} in / "
                f"{c['output_tokens']} out, ${float(c['cost_usd']):.6f}, {c['latency_ms']:.0f} ms</li>"
                for c in step_calls
            )
            items.append(f"<li>step {_e(step)}: {len(step_calls)} call(s)<ul>{lines}</ul></li>")
        out.append(
            f"<details><summary>{_e(task['task_id'])}: tenant {_e(task['task_tenant'])}, workflow {_e(workflow)} "
            f"({_e(kind)}), {task['calls']} calls, ${float(task['cost_usd']):.6f}</summary><ul>{''.join(items)}</ul>"
            "</details>"
        )
    return "".join(out)


def _anomaly_table(result: Result) -> str:
    rows = [row for row in result.dicts() if row["anomaly"]]
    if not rows:
        return "<p>No hour left its band.</p>" if result.rows else ""
    body = "".join(
        f"<tr><td>{_e(r['scope'])}</td><td>{_e(r['key'])}</td><td>{r['hour']:%Y-%m-%d %H:00}</td>"
        f"<td>${r['cost_usd']:.6f}</td><td>${r['band_mean']:.6f} ± ${3 * r['band_sd']:.6f}</td></tr>"
        for r in rows[:50]
    )
    return (
        f"<table><tr><th>scope</th><th>key</th><th>hour (UTC)</th><th>spend</th><th>usual band</th></tr>{body}</table>"
    )


def _e(value: Any) -> str:
    return html.escape(str(value))


def _sql_block(section: Section) -> str:
    parts = []
    for result in section.results:
        used = used_parameters(result.query, section.parameters)
        values = ", ".join(f"{name} = {_e(_show(value))}" for name, value in used.items())
        parts.append(
            f"<p class='meta'>{_e(result.query.name)}: {len(result.rows)} rows in {result.elapsed_ms:.0f} ms"
            f"{'; parameters: ' + values if values else ''}</p><pre>{_e(result.query.sql)}</pre>"
        )
    return f"<details class='sql'><summary>SQL</summary>{''.join(parts)}</details>"


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return f"'{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}'"
    if isinstance(value, list):
        return f"[{len(value)} ids]" if len(value) > 3 else str(value)
    return repr(value)


def _figure(section: Section) -> str:
    if section.image is None:
        body = f"<p class='no-data'>No data yet: {_e(section.no_data)}.</p>"
    else:
        data = base64.b64encode(section.image).decode()
        body = f"<img class='plot' alt='{_e(section.title)}' src='data:image/png;base64,{data}'>"
    return (
        f"<section class='figure' id='{section.key}' data-figure='{section.key}'><h2>{_e(section.title)}</h2>"
        f"<p>{_e(section.explains)}</p>{body}{section.extra}{_sql_block(section)}</section>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
section.figure { border-top: 1px solid #ccc; padding-top: 1em; margin-top: 2em; }
img.plot { max-width: 100%; }
p.no-data { background: #f6f6f6; border: 1px dashed #aaa; padding: 2em; text-align: center; font-size: 1.1em; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
p.meta { color: #666; font-size: 0.85em; margin-bottom: 0; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; }
nav a { margin-right: 1em; }
"""

# Checks each plot decoded and records script errors where a headless browser's DOM dump shows them.
_SCRIPT = """
var errors = 0;
window.addEventListener('error', function () { errors += 1; document.body.dataset.scriptErrors = errors; });
window.addEventListener('load', function () {
  var plots = document.querySelectorAll('img.plot');
  var rendered = 0;
  plots.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { rendered += 1; } });
  document.body.dataset.plots = plots.length;
  document.body.dataset.plotsRendered = rendered;
  document.body.dataset.scriptErrors = errors;
});
"""


def _page(window: ReportWindow, sections: list[Section], calls: int, spent: float) -> str:
    scope = f"tenant {window.tenant}" if window.tenant else "every tenant"
    nav = "".join(f"<a href='#{s.key}'>{_e(s.key)}</a>" for s in sections)
    header = (
        f"<h1>frugalmesh report</h1><p>{_e(scope)}, calls from {window.since:%Y-%m-%d %H:%M} to "
        f"{window.until:%Y-%m-%d %H:%M} UTC; month to date from {window.month_start:%Y-%m-%d}.</p>"
        f"<p class='totals'>Spend <b data-spend-usd='{spent:.12f}'>${spent:,.6f}</b> over "
        f"<b data-calls='{calls}'>{calls:,}</b> calls.</p>"
        "<p>Every figure's SQL is under it: paste it into <code>frugalmesh sql</code>, with the parameter values "
        "written in.</p>"
    )
    body = "".join(_figure(section) for section in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>frugalmesh report</title>"
        f"<style>{_STYLE}</style></head><body data-report='frugalmesh'>{header}<nav>{nav}</nav>{body}"
        f"<script>{_SCRIPT}</script></body></html>"
    )
