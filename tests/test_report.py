"""`frugalmesh report` on a real mesh's rows, opened in headless Chromium.

The module's mesh (planner, router, local and cloud inference, artifact store, accountant) runs
in-process on the session's nats-server and ClickHouse, its own prefix and database. Recorded GSM8K
prompts go through it for three tenants: short ones answered locally (replay), long ones and the
reviews on the frontier (a loopback fake of the OpenAI wire protocol, streamed, so time to first
token is measured), a goal asked four times (two exact-cache hits, then anti-loop's refusal), a task
pinned to a model that does not exist, a tenant whose day cap refuses every call and one whose kill
switch is tripped. Thirty hours of earlier spend with a spike go through the accountant's real
ingest (JetStream), so the anomaly figure has a history to draw. Then the CLI writes the report in
a subprocess, as a user runs it, and Chromium loads it: every plot decoded, no script error, a
screenshot kept (its path is printed; FRUGALMESH_TEST_ARTIFACTS names a folder to keep it in).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import nats
import pytest
from click.testing import CliRunner
from fakes.deploy import openai_deploy
from fakes.openai_server import Behaviour, FakeOpenAI
from helpers import database_url, eventually, kill_switch
from mesh_client import submit

from schemas.messages import Task, UsageEvent
from schemas.subjects import HEADER_MSG_ID
from services.accountant.clickhouse import client, create_schema
from services.analytics import queries
from services.analytics.data import ReportWindow, fetch, query_parameters
from services.analytics.report import Caps, build
from services.cli.main import cli
from services.registry import create_app
from services.runtime.bus import Bus, now_ms
from services.runtime.catalog import Catalog
from services.runtime.control import set_kill
from services.runtime.data import load_recorded_outcomes
from services.runtime.settings import MeshSettings

FIGURES = (
    "spend",
    "savings",
    "pacing",
    "latency",
    "cache",
    "defences",
    "artifacts",
    "tokens",
    "costliest",
    "anomalies",
)
BUDGETS = """
[global]
month_usd = 1000.0
[tenants.acme]
month_usd = 5.0
[tenants.tiny]
day_usd = 0.000000001
"""
SPIKE_USD = 0.5


@dataclass(frozen=True)
class Populated:
    settings: MeshSettings
    analyst_url: str  # the read-only analyst, on this module's database
    tasks: int


def history(now: datetime) -> list[UsageEvent]:
    """Thirty earlier hours of one call each for tenant acme on virtual key fmk_hist, about a cent an
    hour, and one hour (two hours ago) of SPIKE_USD."""
    events = []
    for hours_ago in range(2, 32):
        cost = SPIKE_USD if hours_ago == 2 else 0.01 + 0.001 * (hours_ago % 3)
        events.append(
            UsageEvent(
                event_id=f"hist-{hours_ago}", time_ms=int((now - timedelta(hours=hours_ago)).timestamp() * 1000),
                tenant="acme", task_id=f"hist-task-{hours_ago}", step_id="answer", call_id=f"hist-{hours_ago}",
                service="cloud-inference", tier="frontier", provider="openai", model="gpt-4-1106-preview",
                requested_model="gpt-4-1106-preview", input_tokens=300, output_tokens=100, cost_usd=cost,
                latency_ms=900.0, outcome="ok", key_id="fmk_hist", ttft_ms=120.0,
            )
        )  # fmt: skip
    return events


@pytest.fixture(scope="module")
async def populated(infra, data_dir, tmp_path_factory) -> Populated:
    prefix = "rep" + uuid.uuid4().hex[:8]
    tmp = tmp_path_factory.mktemp("report")
    with FakeOpenAI(Behaviour(reply="ACCEPT")) as frontier, pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", "sk-test")
        deploy = openai_deploy(tmp / "deploy", frontier.url)
        (deploy / "budgets.toml").write_text(BUDGETS)
        settings = MeshSettings(
            nats_url=infra[0], clickhouse_url=infra[1], subject_prefix=prefix, data=data_dir, deploy_dir=deploy,
            log_level="WARNING",
        )  # fmt: skip
        apps = []
        services = ("accountant", "artifact-store", "router", "local-inference", "cloud-inference", "planner")
        try:
            for name in services:
                app = create_app(name, settings, **({"database": prefix} if name == "accountant" else {}))
                await app.start()
                apps.append(app)
            tasks = await run_tasks(settings, data_dir)
            await ingest_history(settings, infra[1], prefix)
            yield Populated(settings, database_url(infra.clickhouse_analyst_url, prefix), tasks)
        finally:
            for app in reversed(apps):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(app.stop(), 10)


async def run_tasks(settings: MeshSettings, data_dir: Path) -> int:
    gsm8k = [r.prompt for r in load_recorded_outcomes(data_dir) if r.dataset == "gsm8k"]
    # Every task its own goal but the repeated one, so the exact-match cache hits only where meant to.
    short = [p for p in gsm8k if len(p) <= 200][:11]
    long = [p for p in gsm8k if len(p) > 300][:3]
    bus = Bus(settings, "test")
    await bus.connect()
    await set_kill(bus, kill_switch("tenant", "initech"))
    await bus.close()

    def task(goal: str, tenant: str = "acme", **fields) -> Task:
        return Task(id=uuid.uuid4().hex[:12], tenant=tenant, goal=goal, deadline_s=60, **fields)

    repeated = short[0]
    batch = [
        *(task(goal) for goal in short[1:4]),
        *(task(goal, "globex") for goal in short[4:6]),
        *(task(goal) for goal in long[:2]),
        task(long[2], "globex"),
        *(task(goal, workflow="draft-review") for goal in short[6:8]),
        task(short[8], allow_models=["no-such-model"]),
        task(short[9], "tiny"),
        task(short[10], "initech"),
    ]
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    try:
        # The repeated goal one after another: the first fills the cache, two hits, the fourth is a loop.
        for _ in range(4):
            await submit(nc, settings, task(repeated), timeout_s=60)
        await asyncio.gather(*(submit(nc, settings, t, timeout_s=60) for t in batch))
    finally:
        await nc.close()
    return 4 + len(batch)


async def ingest_history(settings: MeshSettings, writer_url: str, database: str) -> None:
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    js = nc.jetstream()
    events = history(datetime.now(UTC))
    for event in events:
        await js.publish(
            settings.subjects.usage(event.tenant), msgspec.json.encode(event), headers={HEADER_MSG_ID: event.event_id}
        )
    await nc.close()
    ch = client(writer_url)

    def ingested() -> bool:
        stored = ch.query(
            f"SELECT count() FROM `{database}`.usage_events FINAL WHERE event_id LIKE 'hist-%'"
        ).result_rows[0][0]
        return stored == len(events)

    await eventually(ingested, timeout_s=30)


def frugalmesh(populated: Populated, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NATS_URL": populated.settings.nats_url,
        "CLICKHOUSE_ANALYST_URL": populated.analyst_url,
        "FRUGALMESH_SUBJECT_PREFIX": populated.settings.subject_prefix,
        "FRUGALMESH_DEPLOY_DIR": str(populated.settings.deploy_dir),
        "FRUGALMESH_HOME": str(home),
    }
    command = [sys.executable, "-m", "services.cli.main", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def chromium(page: Path, screenshot: Path) -> dict[str, str]:
    """Load ``page`` headless: the attributes the page's script set on <body>, and a screenshot."""
    browser = shutil.which("chromium")
    assert browser, "Chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60).stdout
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1200,9000", page.as_uri()],
                   capture_output=True, timeout=60)  # fmt: skip
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, "Chromium took no screenshot"
    body = re.search(r"<body([^>]*)>", dom)
    assert body, f"no <body> in Chromium's DOM:\n{dom[:2000]}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FRUGALMESH_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.infra
@pytest.mark.slow
async def test_report_of_a_real_mesh_renders_every_figure_in_chromium(populated, tmp_path):
    page = tmp_path / "report.html"
    done = await asyncio.to_thread(frugalmesh, populated, "report", "--since", "7d", "--out", str(page), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"wrote {page}" in done.stdout
    text = page.read_text()

    screenshot = artifacts_dir(tmp_path) / "report.png"
    body = await asyncio.to_thread(chromium, page, screenshot)
    print(f"report screenshot: {screenshot}")
    assert body["script-errors"] == "0"
    assert body["plots"] == body["plots-rendered"] == str(len(FIGURES))

    # Self-contained: nothing to fetch, every figure drawn and carrying the SQL that made it.
    links = re.findall(r"(?:src|href)=['\"]([^'\"#][^'\"]*)", text)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert "<link" not in text and "<script src" not in text
    assert "No data yet" not in text
    for key in FIGURES:
        section = re.search(rf"<section class='figure' id='{key}'.*?</section>", text, re.S)
        assert section and "<img class='plot'" in section.group(0) and "<pre>SELECT" in section.group(0), key
    assert "Caps: as the accountant holds them now." in text

    # The totals are the accountant's rows, exactly.
    analyst = client(populated.analyst_url)
    calls, spend = analyst.query(
        "SELECT count(), sum(cost_usd) FROM usage_events FINAL WHERE time >= now() - INTERVAL 7 DAY"
    ).result_rows[0]
    assert f"data-calls='{calls}'" in text
    assert Decimal(re.search(r"data-spend-usd='([0-9.]+)'", text).group(1)) == spend


@pytest.mark.infra
@pytest.mark.slow
async def test_report_queries_answer_what_the_mesh_did(populated):
    analyst = client(populated.analyst_url)
    now = datetime.now(UTC)
    window = ReportWindow(since=now - timedelta(days=7), until=now)
    parameters = query_parameters(window, bucket_s=3600, frontier=(10.0, 10.0, 30.0))

    def rows(query: queries.Query) -> list[dict]:
        return fetch(analyst, query, parameters).dicts()

    stopped = {(r["unit"], r["layer"]): r["n"] for r in rows(queries.DEFENCES)}
    assert stopped[("calls", "3 kill switch")] == 1 and stopped[("tasks", "3 kill switch")] == 1
    assert stopped[("calls", "3/5 cap or pacing refusal")] >= 1
    assert stopped[("tasks", "2 anti-loop")] == 1 and stopped[("tasks", "4 pinning")] == 1

    [cache] = fetch(analyst, queries.CACHE, {**parameters, "bucket_s": 86_400 * 30}).dicts()
    hits = analyst.query("SELECT countIf(outcome = 'cache_hit'), count() FROM usage_events FINAL "
                         "WHERE outcome NOT IN ('refused', 'killed')").result_rows[0]  # fmt: skip
    assert hits[0] == 2 and cache["exact_cache_hit_share"] == pytest.approx(hits[0] / hits[1])

    latency = {r["model"]: r for r in rows(queries.LATENCY)}
    assert latency["gpt-4-1106-preview"]["ttft_ms"][0] > 0  # streamed by the fake: measured
    assert all(v != v for v in latency["mixtral-8x7b-local"]["ttft_ms"])  # replay: not streamed, no samples

    anomalies = [(r["scope"], r["key"]) for r in rows(queries.ANOMALIES) if r["anomaly"] and r["cost_usd"] >= SPIKE_USD]
    assert ("tenant", "acme") in anomalies and ("key", "fmk_hist") in anomalies

    by_workflow = {r["name"]: r for r in rows(queries.ARTIFACT_COST) if r["by"] == "workflow"}
    assert by_workflow["answer"]["completed"] >= 8 and by_workflow["draft-review"]["completed"] == 2
    multiplier = {r["workflow"]: r["multiplier"] for r in rows(queries.TOKEN_MULTIPLIER)}
    assert multiplier["answer"] == pytest.approx(1.0) and multiplier["draft-review"] > 1.0


@pytest.mark.infra
def test_a_report_of_an_empty_database_says_no_data_yet_for_every_figure(
    clickhouse_url, clickhouse_analyst_url, tmp_path
):
    database = "empty" + uuid.uuid4().hex[:8]
    create_schema(client(clickhouse_url), database)
    now = datetime.now(UTC)
    page = tmp_path / "empty.html"
    page.write_text(
        build(
            client(database_url(clickhouse_analyst_url, database)), ReportWindow(now - timedelta(days=7), now),
            Catalog.load(MeshSettings().deploy_dir), Caps({"*": 1000.0}, "test caps"),
        )
    )  # fmt: skip
    text = page.read_text()
    assert text.count("No data yet:") == len(FIGURES)
    body = chromium(page, tmp_path / "empty.png")
    assert body["script-errors"] == "0" and body["plots"] == body["plots-rendered"] == "0"


@pytest.mark.unit
def test_a_bad_since_says_what_to_write(tmp_path):
    result = CliRunner().invoke(cli, ["report", "--since", "7x", "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    assert "give a positive whole number and a unit m, h, d or w (e.g. 7d, 12h)" in result.output
