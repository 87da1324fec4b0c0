"""Spend alerts (deploy/alerts.toml): a rule that fires is a message on mesh.alert.<tenant>, a row in
ClickHouse and a webhook POST, once per window; the anomaly and cap rules judge real ClickHouse rows;
a malformed file is refused with the rule named.

Real nats-server, real embedded ClickHouse, a real loopback HTTP server for the webhook. Each test has
its own subject prefix and database.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
from helpers import eventually

from schemas.messages import Alert, ArtifactRef, TaskEvent, UsageEvent
from services.accountant.alert_queries import SpendQueries
from services.accountant.alert_rules import AlertConfig, AlertRule
from services.accountant.alerts import findings
from services.accountant.budget import BudgetBook, BudgetConfig, Caps
from services.accountant.clickhouse import create_schema
from services.accountant.ledger import pico
from services.accountant.rows import TASKS, USAGE, task_row, usage_row
from services.runtime.bus import Bus

HOUR_MS = 3_600_000
# 2025-11-20 12:30 UTC: mid-hour and mid-day, so every window of these tests is unambiguous.
NOW_MS = 1_763_596_800_000 + 12 * HOUR_MS + 30 * 60_000
HOUR_START_MS = NOW_MS - 30 * 60_000
DAY_START_MS = 1_763_596_800_000


def usage(n: int, tenant: str, cost: float, time_ms: int = NOW_MS, **fields) -> UsageEvent:
    return UsageEvent(
        event_id=f"{tenant}-{n}-{time_ms}",
        time_ms=time_ms,
        tenant=tenant,
        task_id=fields.pop("task_id", f"task-{n}"),
        service="cloud-inference",
        tier="mid",
        provider="together",
        model="mixtral-8x7b",
        requested_model="mixtral-8x7b",
        output_tokens=100,
        cost_usd=cost,
        outcome="ok",
        **fields,
    )


class Webhook:
    """A loopback HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.mark.infra
async def test_spend_over_threshold_alerts_once_on_nats_clickhouse_and_webhook(
    settings, start_service, bus: Bus, nc, ch, webhook
):
    database = settings.subject_prefix
    rule = AlertRule(
        name="tenant-day", kind="spend", scope="tenant", window="day", threshold_usd=1.0, webhook=webhook.url
    )
    config = AlertConfig(rules=(rule,), interval_s=0.2)
    received: list[tuple[str, Alert]] = []

    async def keep(msg) -> None:
        received.append((msg.subject, msgspec.json.decode(msg.data, type=Alert)))

    await nc.subscribe(settings.subjects.alert_all, cb=keep)

    async def accountant():
        return await start_service(
            "accountant", settings, database=database, alerts=config, clock=lambda: NOW_MS, ack_wait_s=2.0
        )

    first = await accountant()
    # acme crosses $1 in three calls (the first two stay under it); beta spends under it.
    for n, cost in enumerate((0.40, 0.50, 0.30)):
        await bus.publish_usage(usage(n, "acme", cost))
    await bus.publish_usage(usage(9, "beta", 0.90))
    await eventually(lambda: received, message="no alert on mesh.alert.>")

    subject, alert = received[0]
    assert subject == settings.subjects.alert("acme")
    assert (alert.rule, alert.kind, alert.scope, alert.key, alert.tenant) == (
        "tenant-day",
        "spend",
        "tenant",
        "acme",
        "acme",
    )
    assert alert.alert_id == f"tenant-day/acme/{DAY_START_MS}"
    assert (alert.window, alert.window_start_ms, alert.window_end_ms) == (
        "day",
        DAY_START_MS,
        DAY_START_MS + 24 * HOUR_MS,
    )
    assert alert.value_usd == pytest.approx(1.20)
    assert alert.threshold_usd == 1.0
    rows = await eventually(
        lambda: (
            ch.query(
                f"SELECT alert_id, tenant, rule, key, value_usd, threshold_usd FROM {database}.alerts FINAL"
            ).result_rows
        )
    )
    assert rows == [(alert.alert_id, "acme", "tenant-day", "acme", Decimal("1.2"), Decimal("1"))]
    [(content_type, body)] = await eventually(lambda: webhook.received, message="no webhook POST")
    assert content_type == "application/json"
    assert body["alert_id"] == alert.alert_id and body["value_usd"] == pytest.approx(1.20)
    assert "tenant acme spent $1.2000" in body["text"]

    # A restarted accountant finds the alert sent: acme's further spend in the same day alerts nobody,
    # while beta, crossing now, does (the later event that proves acme's silence).
    await first.stop()
    await accountant()
    await bus.publish_usage(usage(3, "acme", 5.0))
    await bus.publish_usage(usage(10, "beta", 0.50))
    await eventually(lambda: len(received) == 2, message="beta's alert did not come")
    assert [(s, a.key) for s, a in received] == [
        (settings.subjects.alert("acme"), "acme"),
        (settings.subjects.alert("beta"), "beta"),
    ]
    await eventually(lambda: len(webhook.received) == 2, message="beta's webhook did not come")
    stored = ch.query(f"SELECT key FROM {database}.alerts FINAL ORDER BY key").result_rows
    assert stored == [("acme",), ("beta",)]


@pytest.fixture
def queries(ch, settings) -> SpendQueries:
    database = settings.subject_prefix
    create_schema(ch, database)
    return SpendQueries(ch, database)


def insert_usage(ch, database: str, events: list[UsageEvent]) -> None:
    ch.insert(USAGE.table, [usage_row(e) for e in events], column_names=list(USAGE.columns), database=database)


@pytest.mark.infra
def test_anomaly_rule_fires_on_an_hour_outside_the_trailing_band(ch, settings, queries):
    # Six trailing hours of about $1 an hour each for acme, beta and delta; this hour acme spends $4 (far
    # above mean + 3 sigma), beta $1.05 (inside its band), delta nothing. gamma has no history: no band.
    trailing = [1.00, 1.10, 0.90, 1.00, 1.05, 0.95]
    events = []
    for tenant, now in (("acme", 4.0), ("beta", 1.05), ("delta", None)):
        for i, cost in enumerate(trailing, start=1):
            events.append(usage(i, tenant, cost, HOUR_START_MS - i * HOUR_MS + 60_000))
        if now is not None:
            events.append(usage(0, tenant, now))
    events.append(usage(0, "gamma", 50.0))
    insert_usage(ch, settings.subject_prefix, events)
    book = BudgetBook(BudgetConfig())
    rule = AlertRule(name="hourly-band", kind="anomaly", scope="tenant", trailing_hours=6, sigmas=3.0, min_usd=0.5)

    [alert] = findings(rule, queries, book, NOW_MS)

    assert (alert.key, alert.tenant, alert.window_start_ms) == ("acme", "acme", HOUR_START_MS)
    assert alert.alert_id == f"hourly-band/acme/{HOUR_START_MS}/above"
    assert alert.value_usd == pytest.approx(4.0)
    mean, stdev = 1.0, (sum((c - 1.0) ** 2 for c in trailing) / 6) ** 0.5
    assert alert.threshold_usd == pytest.approx(mean + 3 * stdev)
    # min_usd: a deviation smaller than it is no alert, whatever the band says.
    calm = AlertRule(name="calm", kind="anomaly", scope="tenant", trailing_hours=6, sigmas=3.0, min_usd=3.5)
    assert findings(calm, queries, book, NOW_MS) == []
    # Spend that stopped: an hour later, delta's last complete hour ($0) is below its band; acme's ($4) and
    # beta's ($1.05) are not.
    below = AlertRule(name="quiet", kind="anomaly", scope="tenant", trailing_hours=6, min_usd=0.5, direction="below")
    [quiet] = findings(below, queries, book, NOW_MS + HOUR_MS)
    assert (quiet.key, quiet.value_usd, quiet.alert_id) == ("delta", 0.0, f"quiet/delta/{HOUR_START_MS}/below")


@pytest.mark.infra
def test_cap_rule_fires_at_its_share_of_the_cap_in_force(ch, settings, queries):
    insert_usage(ch, settings.subject_prefix, [usage(1, "acme", 4.0), usage(2, "acme", 4.5), usage(3, "beta", 7.0)])
    book = BudgetBook(
        BudgetConfig(caps={("tenant", "acme"): Caps(day=pico(10.0)), ("tenant", "beta"): Caps(month=pico(10.0))})
    )
    rule = AlertRule(name="cap-80", kind="cap", scope="tenant", window="day", percent=80)

    [alert] = findings(rule, queries, book, NOW_MS)

    # acme: $8.50 of its $10 day cap (85%); beta has only a month cap, so a day rule does not judge it.
    assert (alert.key, alert.value_usd, alert.threshold_usd) == ("acme", pytest.approx(8.5), pytest.approx(8.0))
    assert alert.alert_id == f"cap-80/acme/{DAY_START_MS}"
    assert "85% of its $10.00 cap" in alert.detail
    month = AlertRule(name="month-50", kind="cap", scope="tenant", window="month", percent=50)
    assert [a.key for a in findings(month, queries, book, NOW_MS)] == ["beta"]


@pytest.mark.infra
def test_scopes_group_spend_by_key_agent_and_the_tasks_workflow(ch, settings, queries):
    database = settings.subject_prefix
    insert_usage(
        ch,
        database,
        [
            usage(1, "acme", 2.0, key_id="fmk_a", agent="debate", task_id="t1"),
            usage(2, "beta", 2.0, key_id="fmk_b", agent="debate", task_id="t1"),
            usage(3, "acme", 0.5, task_id="t2"),
        ],
    )
    done = TaskEvent(
        task_id="t1",
        tenant="acme",
        kind="done",
        time_ms=NOW_MS,
        workflow="research",
        artifact=ArtifactRef(id="a" * 64, type="answer"),
    )
    ch.insert(TASKS.table, [task_row(done)], column_names=list(TASKS.columns), database=database)
    book = BudgetBook(BudgetConfig())

    def fired(scope: str, **narrow) -> list[tuple[str, str]]:
        rule = AlertRule(name=scope, kind="spend", scope=scope, window="1h", threshold_usd=1.0, **narrow)
        return [(a.key, a.tenant) for a in findings(rule, queries, book, NOW_MS)]

    # Each key is one tenant's; the agent served two tenants, so its alert is mesh-wide.
    assert fired("key") == [("fmk_a", "acme"), ("fmk_b", "beta")]
    assert fired("agent") == [("debate", "_mesh")]
    assert fired("agent", tenant="beta") == [("debate", "beta")]
    # Only acme's t1 ended with workflow research: beta's t1 is another task (ids are per tenant).
    assert fired("workflow") == [("research", "acme")]
    assert fired("global") == [("*", "_mesh")]


BAD_RULES = [
    ('kind = "spend"\nscope = "tenant"\nwindow = "1h"\ntreshold_usd = 5', "unknown key 'treshold_usd'"),
    ('kind = "spend"\nscope = "tenant"\nwindow = "7m"\nthreshold_usd = 5', "window '7m' must be day, month"),
    ('kind = "spend"\nscope = "team"\nwindow = "1h"\nthreshold_usd = 5', "scope must be one of global, tenant"),
    ('kind = "spend"\nscope = "tenant"\nwindow = "1h"', "missing key 'threshold_usd'"),
    ('kind = "spend"\nscope = "tenant"\nwindow = "1h"\nthreshold_usd = -1', "threshold_usd must be > 0"),
    ('kind = "cap"\nscope = "agent"\nwindow = "day"\npercent = 80', "scope must be one of global, tenant, model, key"),
    ('kind = "cap"\nscope = "tenant"\nwindow = "1h"\npercent = 80', "window must be one of day, month"),
    ('kind = "anomaly"\nscope = "tenant"\ntrailing_hours = 1.5', "trailing_hours must be a whole number"),
    ('kind = "spend"\nscope = "tenant"\nwindow = "1h"\nthreshold_usd = 1\nwebhook = "hooks.example.com"', "webhook"),
    ('kind = "budget"\nscope = "tenant"', "kind must be one of spend, anomaly, cap"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("body", "error"), BAD_RULES)
def test_a_malformed_rule_is_refused_with_the_file_and_rule_named(tmp_path: Path, body: str, error: str):
    path = tmp_path / "alerts.toml"
    good = '[rules.ok]\nkind = "spend"\nscope = "tenant"\nwindow = "day"\nthreshold_usd = 1\n'
    path.write_text(f"{good}\n[rules.acme-hourly]\n{body}\n")
    with pytest.raises(ValueError) as refused:
        AlertConfig.load(path)
    assert str(refused.value).startswith(f"{path}: [rules.acme-hourly]: ")
    assert error in str(refused.value)


@pytest.mark.unit
def test_the_shipped_file_and_its_examples_load(tmp_path: Path):
    shipped = Path(__file__).parent.parent / "deploy" / "alerts.toml"
    assert AlertConfig.load(shipped).interval_s == 60
    # The commented examples are valid rules once uncommented.
    text = shipped.read_text()
    examples = tmp_path / "alerts.toml"
    examples.write_text("\n".join(line.removeprefix("# ") for line in text[text.index("# [rules.") :].splitlines()))
    rules = AlertConfig.load(examples).rules
    assert [(r.name, r.kind) for r in rules] == [
        ("tenant-hourly-spend", "spend"),
        ("key-spend-anomaly", "anomaly"),
        ("tenant-month-cap-80", "cap"),
    ]


@pytest.mark.infra
async def test_the_accountant_does_not_start_on_a_malformed_rules_file(settings, start_service, tmp_path: Path):
    path = tmp_path / "alerts.toml"
    path.write_text('[rules.acme-hourly]\nkind = "spend"\nscope = "tenant"\nwindow = "1h"\nthreshold = 5\n')
    with pytest.raises(ValueError, match=r"alerts.toml: \[rules.acme-hourly\]: unknown key 'threshold'"):
        await start_service("accountant", settings, database=settings.subject_prefix, alerts=path)


@pytest.mark.infra
async def test_only_the_accountant_leading_budgets_evaluates_alerts(settings, start_service, bus: Bus, nc):
    def rules(name: str) -> AlertConfig:  # each replica its own rule: an alert's rule says who evaluated
        rule = AlertRule(name=name, kind="spend", scope="tenant", window="day", threshold_usd=1.0)
        return AlertConfig(rules=(rule,), interval_s=0.1)

    received: list[Alert] = []

    async def keep(msg) -> None:
        received.append(msgspec.json.decode(msg.data, type=Alert))

    await nc.subscribe(settings.subjects.alert_all, cb=keep)
    options = {"database": settings.subject_prefix, "clock": lambda: NOW_MS, "ack_wait_s": 2.0}
    leader = await start_service("accountant", settings, alerts=rules("leader"), **options)
    await start_service("accountant", settings, alerts=rules("standby"), **options)  # once it saw the leader renew
    await bus.publish_usage(usage(1, "acme", 2.0))
    await eventually(lambda: received, message="no alert")
    # A later crossing the leader alerts too: meanwhile a standby evaluating every 0.1 s would have sent acme's.
    await bus.publish_usage(usage(2, "beta", 2.0))
    await eventually(lambda: any(a.key == "beta" for a in received), message="no alert for beta")
    assert [(a.rule, a.key) for a in received] == [("leader", "acme"), ("leader", "beta")]

    await asyncio.wait_for(leader.stop(), 15)  # the standby takes the lease, and with it the alerts
    await eventually(lambda: len(received) >= 4, message="the new leader sent no alert")
    assert sorted((a.rule, a.key) for a in received[2:]) == [("standby", "acme"), ("standby", "beta")]
