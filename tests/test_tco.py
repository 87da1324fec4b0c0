"""`frugalmesh tco`: seed 000's break-even recomputed from the shipped hardware profile, and the mesh's own
API traffic (real ClickHouse rows, written by the accountant's row writer) priced on owned hardware."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from click.testing import CliRunner

from schemas.messages import UsageEvent
from services.accountant.clickhouse import create_schema
from services.accountant.rows import USAGE, usage_row
from services.cli.main import cli
from services.economics.tco import (
    REFERENCE_PROFILE,
    break_even_tokens_per_day,
    mesh_traffic,
    output_capacity_per_day,
    owning_usd_per_day,
    owning_usd_per_day_for,
    profile_assumptions,
    reproduce,
)
from services.runtime.bus import now_ms
from services.runtime.hardware import HardwareProfile, load_profiles
from services.runtime.settings import REPO_DEPLOY_DIR

HARDWARE = REPO_DEPLOY_DIR / "hardware.toml"
DAY_MS = 86_400_000

# $0.90/h of hardware plus 500 W at $0.20/kWh ($0.10/h): $1.00/h, $24 a day. It decodes 100 tokens/s
# (8.64M a day) and prefills 1,000 tokens/s.
BOX = HardwareProfile(
    name="box",
    hardware_usd_per_hour=0.90,
    watts=500,
    usd_per_kwh=0.20,
    utilisation=1.0,
    input_tokens_per_s=1_000,
    output_tokens_per_s=100,
)


@pytest.mark.unit
def test_the_shipped_rtx4080_profile_reproduces_seed_000s_9_1_million_tokens_a_day():
    profile = load_profiles(HARDWARE)[REFERENCE_PROFILE]
    assumptions = profile_assumptions(HARDWARE, REFERENCE_PROFILE)
    # The stated assumptions, as the command prints them.
    assert assumptions == {
        "purchase_usd": 1199,
        "lifetime_years": 3,
        "watts": 320,
        "usd_per_kwh": 0.17,
        "input_tokens_per_s": 4000,
        "output_tokens_per_s": 110,
    }
    reference = reproduce(profile, assumptions, {"mixtral-8x7b": 0.60, "gpt-4-1106-preview": 30.0})

    # $1,199 over 3 x 8,760 h plus 0.32 kW x $0.17: $0.100024/h, $2.4006 a day; over $0.264 per million.
    day = 24 * (1199 / (3 * 8760) + 0.320 * 0.17)
    assert reference.owning_usd_per_day == pytest.approx(day)
    assert reference.api_usd_per_mtok == 0.264
    assert reference.break_even_tokens_per_day == pytest.approx(day / 0.264 * 1e6)
    assert round(reference.break_even_tokens_per_day / 1e6, 1) == 9.1
    assert reference.holds
    # One card at 110 tokens/s makes 9.504M a day: the claim needs it busy 96% of the day.
    assert reference.capacity_tokens_per_day == 110 * 86_400
    assert reference.utilisation_at_break_even == pytest.approx(day / 0.264 * 1e6 / (110 * 86_400))
    assert [(name, round(n)) for name, _, n in reference.against] == [
        ("mixtral-8x7b", round(day / 0.60 * 1e6)),
        ("gpt-4-1106-preview", round(day / 30 * 1e6)),
    ]
    # Any other API price does not give the claim.
    assert not reproduce(profile, assumptions, {}, api_usd_per_mtok=0.60).holds


@pytest.mark.unit
def test_break_even_is_the_daily_cost_of_owning_over_the_api_price_and_owning_steps_at_capacity():
    assert owning_usd_per_day(BOX) == pytest.approx(24.0)
    assert break_even_tokens_per_day(BOX, 2.0) == pytest.approx(12e6)  # $24 / $2 per million
    assert output_capacity_per_day(BOX) == 8_640_000
    assert owning_usd_per_day_for(BOX, 0) == pytest.approx(24.0)
    assert owning_usd_per_day_for(BOX, 8_640_000) == pytest.approx(24.0)
    assert owning_usd_per_day_for(BOX, 8_640_001) == pytest.approx(48.0)  # a second machine


def usage(n: int, time_ms: int, model: str, tier: str, inputs: int, outputs: int, cost: float, **fields) -> UsageEvent:
    return UsageEvent(
        event_id=f"call-{n}",
        time_ms=time_ms,
        tenant="acme",
        task_id=f"task-{n}",
        service="local-inference" if tier == "local" else "cloud-inference",
        tier=tier,
        provider="local" if tier == "local" else "cloud",
        model=model,
        requested_model=model,
        input_tokens=inputs,
        output_tokens=outputs,
        cost_usd=cost,
        outcome=fields.pop("outcome", "ok"),
        **fields,
    )


def traffic_rows(now: int) -> list[UsageEvent]:
    """Two days of traffic before ``now``: API models mid and frontier, plus what tco leaves out."""
    return [
        # The window starts at the first API call, two days before now.
        usage(1, now - 2 * DAY_MS, "mid-model", "mid", 43_200_000, 8_640_000, 30.0),
        usage(2, now - DAY_MS, "mid-model", "mid", 43_200_000, 8_640_000, 30.0),
        usage(3, now - DAY_MS, "frontier-model", "frontier", 1_000_000, 200_000, 4.0),
        # Not API traffic, or no model ran: a local call, a cache hit, a refusal.
        usage(4, now - DAY_MS, "local-model", "local", 10**9, 10**9, 1.0),
        usage(5, now - DAY_MS, "mid-model", "mid", 10**9, 10**9, 0.0, outcome="cache_hit"),
        usage(6, now - DAY_MS, "mid-model", "mid", 10**9, 10**9, 0.0, outcome="refused"),
        # Before the window.
        usage(7, now - 30 * DAY_MS, "mid-model", "mid", 10**9, 10**9, 500.0),
    ]


@pytest.fixture
def database(ch, settings) -> str:
    create_schema(ch, settings.subject_prefix)
    return settings.subject_prefix


def insert(ch, database: str, events: list[UsageEvent]) -> None:
    ch.insert(USAGE.table, [usage_row(e) for e in events], column_names=list(USAGE.columns), database=database)


@pytest.mark.infra
def test_the_mesh_traffic_per_api_model_priced_on_owned_hardware(ch, database):
    now = 1_764_000_000_000
    insert(ch, database, traffic_rows(now))

    window, [mid, frontier] = mesh_traffic(ch, database, BOX, since_s=7 * 86_400, now_ms=now)

    assert (window.start_ms, window.end_ms, window.days) == (now - 2 * DAY_MS, now, 2.0)
    # mid: 43.2M input and 8.64M output tokens a day, $30 a day. The box prefills them in 43,200 s and
    # decodes them in 86,400 s: 1.5 days of work a day, so two machines ($48) and $18 a day lost.
    assert (mid.model, mid.tier, mid.calls) == ("mid-model", "mid", 2)
    assert (mid.input_tokens_per_day, mid.output_tokens_per_day) == (43_200_000, 8_640_000)
    assert mid.api_usd_per_day == pytest.approx(30.0)
    assert mid.utilisation == pytest.approx(1.5)
    assert (mid.machines, mid.owning_usd_per_day) == (2, pytest.approx(48.0))
    assert mid.saving_usd_per_day == pytest.approx(-18.0)
    # Billed $30 per 8.64M output tokens: $3.47 per million, so one $24 machine pays from 6.9M a day.
    assert mid.api_usd_per_mtok_output == pytest.approx(30 / 8.64)
    assert mid.break_even_tokens_per_day == pytest.approx(24 / (30 / 8.64) * 1e6)
    # frontier: half of its 1M input / 200k output a day ($2): 0.25 h prefill + 0.28 h decode, one machine.
    assert (frontier.output_tokens_per_day, frontier.api_usd_per_day) == (100_000, pytest.approx(2.0))
    assert frontier.utilisation == pytest.approx((500_000 / 1_000 + 100_000 / 100) / 86_400)
    assert (frontier.machines, frontier.saving_usd_per_day) == (1, pytest.approx(2.0 - 24.0))


@pytest.mark.infra
def test_tco_command_prints_json_and_writes_the_plot(ch, database, clickhouse_url, tmp_path: Path):
    insert(ch, database, traffic_rows(now_ms()))
    parts = urlsplit(clickhouse_url)
    env = {
        "FRUGALMESH_HOME": str(tmp_path / "home"),
        "CLICKHOUSE_URL": urlunsplit(parts._replace(path=f"/{database}")),
        "CLICKHOUSE_ANALYST_URL": None,
        "FRUGALMESH_CLICKHOUSE_URL": None,
        "FRUGALMESH_CLICKHOUSE_ANALYST_URL": None,
    }
    plot = tmp_path / "tco.png"

    result = CliRunner().invoke(cli, ["tco", "--json", "--plot", str(plot), "--hardware", "cpu-2core"], env=env)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reference"]["holds"] is True
    assert round(report["reference"]["break_even_output_tokens_per_day"] / 1e6, 1) == 9.1
    assert report["hardware"]["profile"] == "cpu-2core"
    assert [m["model"] for m in report["models"]] == ["mid-model", "frontier-model"]
    assert report["models"][0]["output_tokens_per_day"] == pytest.approx(8_640_000, rel=1e-3)
    assert report["window"]["days"] == pytest.approx(2.0, rel=1e-3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000

    tables = CliRunner().invoke(cli, ["tco", "--since", "1h"], env=env)
    assert tables.exit_code == 0, tables.output
    assert "9.09M output tokens/day (claim 9.1M: reproduced)" in tables.output
    assert "no API calls in the window" in tables.output


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--since", "7 days"], "'7 days' is not a duration: write it as 12h, 7d or 2w"),
        (["--hardware", "rtx5090"], "no profile 'rtx5090'"),
    ],
)
def test_tco_mistakes_say_what_to_write(args: list[str], error: str, tmp_path: Path):
    result = CliRunner().invoke(cli, ["tco", *args], env={"FRUGALMESH_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert error in result.output
