"""Spend alerts: the accountant evaluates deploy/alerts.toml (``alert_rules.py``) every ``interval_s``
and sends each alert once: a message on ``mesh.alert.<tenant>``, a row in ClickHouse ``alerts``, and a
POST to the rule's webhook when it names one.

Spend comes from ClickHouse, not the ledger. The ledger knows only the capped buckets (global, tenant,
model and key, by UTC day and month), holds reservations as well as spend, forgets past days, and lives
in the one accountant that owns the budgets; alerts need any scope (agent, tier, provider, workflow),
hourly history for the anomaly band, and a window of any length, which ``usage_events`` has. The price
is ingest lag (a batch, 0.2 s by default) and one query per rule per evaluation. Cap rules take the cap in
force from the budget book, and compare it with metered spend: outstanding holds are not spend yet.

Once per window, across restarts and replicas: an alert's id is ``<rule>/<scope key>/<window start>``
(anomaly rules add the direction), and it is sent only by whoever creates its key in the KV bucket
``<prefix>_alerts_fired`` (a create is a compare-and-set: exactly one accountant wins, and the key
outlives a restart; it expires after ``FIRED_TTL_S``, longer than any window). A send that fails before
it is stored (NATS or ClickHouse down) deletes the key, so the next evaluation tries again; the message's
``Nats-Msg-Id`` and the table's key make that retry harmless. A crash between the claim and the send
loses that one alert (the rule fires again in the next window). Webhooks are retried ``WEBHOOK_TRIES``
times, then logged: the alert is on NATS and in ClickHouse whatever the receiver does.

Only the accountant leading budgets evaluates (``app.py`` starts it with each term of the lease and
stops it when the term ends, as pacing): the others would only repeat its queries and lose every
claim. The claim still guards the hand-over, when two terms may overlap for a moment.

Not done: no alert is cleared or resolved (each window stands on its own), and rules are read at start
(change the file and restart the accountant).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import statistics
from collections import defaultdict
from datetime import UTC, datetime
from typing import cast

import httpx
import msgspec
from clickhouse_connect.driver.client import Client
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.messages import Alert, AlertKind
from schemas.subjects import ALERT_MESH_WIDE, BUCKET_ALERTS_FIRED, HEADER_MSG_ID, STREAM_ALERTS
from services.accountant import ddl
from services.accountant.alert_queries import ScopeSpend, SpendQueries
from services.accountant.alert_rules import HOUR_S, AlertConfig, AlertRule, window_length_s
from services.accountant.budget import BudgetBook
from services.accountant.clickhouse import client
from services.accountant.ingest import Store
from services.accountant.ledger import dollars
from services.accountant.pacing import month_bounds
from services.accountant.reservations import MsClock
from services.accountant.rows import usd, utc
from services.runtime.bus import Bus, encode

FIRED_TTL_S = 35 * 86_400  # longer than the longest window (a month)
WEBHOOK_TRIES = 3
WEBHOOK_TIMEOUT_S = 5.0
HOUR_MS = HOUR_S * 1000
COLUMNS = (
    "alert_id",
    "time",
    "tenant",
    "rule",
    "kind",
    "scope",
    "key",
    "window",
    "window_start",
    "window_end",
    "value_usd",
    "threshold_usd",
    "detail",
)


def window_bounds(window: str, now_ms: int) -> tuple[int, int]:
    """The UTC-aligned window holding ``now_ms``: [start, end) in ms."""
    length_s = window_length_s(window, window)
    if length_s is None:
        return month_bounds(now_ms)
    length = length_s * 1000
    start = now_ms - now_ms % length
    return start, start + length


def band(history: list[float], sigmas: float) -> tuple[float, float, float]:
    """mean, mean - sigmas * stdev and mean + sigmas * stdev of ``history`` (population stdev)."""
    mean = statistics.fmean(history)
    spread = sigmas * statistics.pstdev(history, mean)
    return mean, mean - spread, mean + spread


def findings(rule: AlertRule, queries: SpendQueries, book: BudgetBook, now_ms: int) -> list[Alert]:
    """The alerts ``rule`` fires at ``now_ms`` (before the once-per-window check)."""
    if rule.kind == "spend":
        start, end = window_bounds(rule.window, now_ms)
        return [
            _alert(rule, s, start, end, now_ms, rule.threshold_usd, _spend_detail(rule, s, start))
            for s in queries.spend(rule, start, end)
            if s.usd > rule.threshold_usd
        ]
    if rule.kind == "cap":
        return _cap_findings(rule, queries, book, now_ms)
    return _anomaly_findings(rule, queries, now_ms)


def _cap_findings(rule: AlertRule, queries: SpendQueries, book: BudgetBook, now_ms: int) -> list[Alert]:
    in_force: dict[str, int] = {}
    for (scope, key), caps in book.caps.items():
        limit = caps.window(rule.window)
        if scope == rule.scope and limit is not None:
            in_force[key] = limit
    if not in_force:
        return []
    start, end = window_bounds(rule.window, now_ms)
    out = []
    for s in queries.spend(rule, start, end, None if rule.scope == "global" else sorted(in_force)):
        cap = dollars(in_force[s.key])
        threshold = cap * rule.percent / 100
        if s.usd > 0 and s.usd >= threshold:
            share = f"{100 * s.usd / cap:.0f}%" if cap else "all"
            detail = (
                f"{_name(rule, s.key)} spent ${s.usd:.4f} this {rule.window} ({_iso(start)}), {share} of its "
                f"${cap:.2f} cap; rule {rule.name} alerts at {rule.percent:g}%"
            )
            out.append(_alert(rule, s, start, end, now_ms, threshold, detail))
    return out


def _anomaly_findings(rule: AlertRule, queries: SpendQueries, now_ms: int) -> list[Alert]:
    """The running hour judged for "above", the last complete hour for "below", each against the
    ``trailing_hours`` complete hours before it."""
    running = now_ms - now_ms % HOUR_MS
    first = running - (rule.trailing_hours + 1) * HOUR_MS
    series: dict[str, dict[int, float]] = defaultdict(dict)
    tenants: dict[str, set[str]] = defaultdict(set)
    for s in queries.hourly(rule, first, running + HOUR_MS):
        series[s.key][s.hour_ms] = s.usd
        tenants[s.key].update(s.tenants)
    judged = []
    if rule.direction in ("above", "both"):
        judged.append(("above", running))
    if rule.direction in ("below", "both"):
        judged.append(("below", running - HOUR_MS))
    out = []
    for key, hours in sorted(series.items()):
        for direction, hour in judged:
            history = [hours.get(hour - i * HOUR_MS, 0.0) for i in range(1, rule.trailing_hours + 1)]
            if not any(history):
                continue  # no band yet
            value = hours.get(hour, 0.0)
            mean, low, high = band(history, rule.sigmas)
            outside = value > high if direction == "above" else value < low
            if not outside or abs(value - mean) < rule.min_usd or (direction == "above" and value <= 0):
                continue
            edge = high if direction == "above" else low
            detail = (
                f"{_name(rule, key)} spent ${value:.4f} in the hour from {_iso(hour)}, {direction} its usual band "
                f"(${max(low, 0.0):.4f} to ${high:.4f}: mean ${mean:.4f} +- {rule.sigmas:g} sigma of the "
                f"{rule.trailing_hours} hours before)"
            )
            spend = ScopeSpend(key, value, tuple(sorted(tenants[key])), hour)
            out.append(_alert(rule, spend, hour, hour + HOUR_MS, now_ms, edge, detail, suffix=f"/{direction}"))
    return out


def _alert(
    rule: AlertRule, s: ScopeSpend, start: int, end: int, now_ms: int, threshold: float, detail: str, suffix: str = ""
) -> Alert:
    return Alert(
        alert_id=f"{rule.name}/{s.key}/{start}{suffix}",
        time_ms=now_ms,
        tenant=_tenant(rule, s),
        rule=rule.name,
        kind=cast(AlertKind, rule.kind),  # checked against KINDS when the rule was read
        scope=rule.scope,
        key=s.key,
        window=rule.window,
        window_start_ms=start,
        window_end_ms=end,
        value_usd=s.usd,
        threshold_usd=threshold,
        detail=detail,
    )


def _tenant(rule: AlertRule, s: ScopeSpend) -> str:
    """Whose alert it is: the rule's tenant, the tenant scope's key, or the one tenant the spend came from."""
    if rule.tenant:
        return rule.tenant
    if rule.scope == "tenant":
        return s.key
    return s.tenants[0] if len(s.tenants) == 1 else ALERT_MESH_WIDE


def _spend_detail(rule: AlertRule, s: ScopeSpend, start: int) -> str:
    return (
        f"{_name(rule, s.key)} spent ${s.usd:.4f} in the {rule.window} window from {_iso(start)}, above "
        f"rule {rule.name}'s ${rule.threshold_usd:g}"
    )


def _name(rule: AlertRule, key: str) -> str:
    name = "the mesh" if rule.scope == "global" else f"{rule.scope} {key}"
    return f"{name} (tenant {rule.tenant})" if rule.tenant else name


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


class Alerts:
    """Evaluates the rules every ``config.interval_s`` from start to stop, sending each new alert once."""

    def __init__(self, bus: Bus, store: Store, book: BudgetBook, config: AlertConfig, clock: MsClock) -> None:
        self.bus = bus
        self.store = store
        self.book = book
        self.config = config
        self.clock = clock
        self._ch: Client | None = None
        self._fired: KeyValue | None = None
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self._posts: set[asyncio.Task] = set()

    def start(self) -> None:
        """Begin evaluating, in the background (after the store is open: its database is the one
        queried); a term of the lease must not wait on, or fail with, ClickHouse."""
        if self.config.rules and self._task is None:
            self._task = asyncio.create_task(self._evaluate_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._posts:
            await asyncio.wait(self._posts, timeout=WEBHOOK_TIMEOUT_S)
        if self._http is not None:
            await self._http.aclose()
        if self._ch is not None:
            self._ch.close()
        self._ch, self._http = None, None

    async def _open(self) -> None:
        ch = await asyncio.to_thread(client, self.store.url)
        try:
            self._fired = await self.bus.key_value(self.bus.subjects.bucket(BUCKET_ALERTS_FIRED), ttl_s=FIRED_TTL_S)
        except BaseException:
            ch.close()
            raise
        self._ch, self._http = ch, httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S)

    async def _evaluate_forever(self) -> None:
        while self._http is None:
            try:
                await self._open()
            except Exception as exc:  # ClickHouse or NATS away: tried again next interval
                self.bus.log.warning("alerts_not_started", error=str(exc))
                await asyncio.sleep(self.config.interval_s)
        while True:
            await self.evaluate()
            await asyncio.sleep(self.config.interval_s)

    async def evaluate(self) -> list[Alert]:
        """One pass over the rules; returns the alerts it sent (those not sent before)."""
        assert self._ch is not None and self.store.database is not None, "Alerts.start() first"
        queries = SpendQueries(self._ch, self.store.database)
        now = self.clock()
        sent = []
        for rule in self.config.rules:
            try:
                found = await asyncio.to_thread(findings, rule, queries, self.book, now)
                for alert in found:
                    if await self._send(alert, rule):
                        sent.append(alert)
            except Exception:  # one rule's failure (ClickHouse away) must not silence the others
                self.bus.log.exception("alert_rule_failed", rule=rule.name)
        return sent

    async def _send(self, alert: Alert, rule: AlertRule) -> bool:
        assert self._fired is not None
        claim = hashlib.sha256(alert.alert_id.encode()).hexdigest()
        try:
            await self._fired.create(claim, encode(alert))
        except KeyWrongLastSequenceError:
            return False  # sent already, by this accountant or another, before or after a restart
        try:
            stream = self.bus.subjects.stream(STREAM_ALERTS)
            headers = {HEADER_MSG_ID: alert.alert_id}
            await self.bus.publish(self.bus.subjects.alert(alert.tenant), alert, stream=stream, headers=headers)
            await asyncio.to_thread(self._insert, alert)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._fired.delete(claim)  # not sent: the next evaluation tries again
            raise
        self.bus.log.warning("alert", rule=alert.rule, tenant=alert.tenant, key=alert.key, detail=alert.detail)
        if rule.webhook:
            post = asyncio.create_task(self._post(rule.webhook, alert))
            self._posts.add(post)
            post.add_done_callback(self._posts.discard)
        return True

    def _insert(self, alert: Alert) -> None:
        assert self._ch is not None
        row = (
            alert.alert_id,
            utc(alert.time_ms),
            alert.tenant,
            alert.rule,
            alert.kind,
            alert.scope,
            alert.key,
            alert.window,
            utc(alert.window_start_ms),
            utc(alert.window_end_ms),
            usd(alert.value_usd),
            usd(alert.threshold_usd),
            alert.detail,
        )
        self._ch.insert(ddl.ALERTS, [row], column_names=list(COLUMNS), database=self.store.database)

    async def _post(self, url: str, alert: Alert) -> None:
        """POST the alert as JSON, plus ``text`` (its detail) so a chat incoming webhook shows it as is."""
        assert self._http is not None
        body = msgspec.json.encode({**msgspec.to_builtins(alert), "text": alert.detail})
        for attempt in range(1, WEBHOOK_TRIES + 1):
            try:
                response = await self._http.post(url, content=body, headers={"Content-Type": "application/json"})
                response.raise_for_status()
                return
            except httpx.HTTPError as exc:
                if attempt == WEBHOOK_TRIES:
                    self.bus.log.warning("alert_webhook_failed", rule=alert.rule, url=url, error=str(exc))
                    return
                await asyncio.sleep(attempt)
