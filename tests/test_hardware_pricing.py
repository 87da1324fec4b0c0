"""Local cost is not zero: hardware profiles (deploy/hardware.toml) price local models, and the usage
row of a local call names the profile that priced it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fakes.grants import granted
from helpers import eventually

from schemas.messages import ChatMessage, InferenceRequest, Usage, UsageEvent
from services.accountant.clickhouse import create_schema
from services.accountant.rows import USAGE, usage_row
from services.routing.table import pick_model
from services.runtime.bus import encode, now_ms
from services.runtime.catalog import Catalog
from services.runtime.data import load_recorded_outcomes
from services.runtime.hardware import load_profiles
from services.runtime.settings import REPO_DEPLOY_DIR

# A bought machine: $9,000 over 10,000 h is $0.90/h, plus 500 W at $0.20/kWh ($0.10/h): $1.00/h.
# Working half of its hours, it decodes 500 tok/s * 1,800 s = 900,000 output tokens an hour
# ($1.00 / 0.9 Mtok = $10/9 per Mtok) and prefills 5,000 tok/s, 9,000,000 input tokens ($1/9).
BOUGHT = """
[profiles.box]
purchase_usd = 9000
lifetime_hours = 10000
watts = 500
usd_per_kwh = 0.20
utilisation = 0.5
input_tokens_per_s = 5000
output_tokens_per_s = 500
"""

MODELS = """
[models.m]
tier = "local"
service = "local"
provider = "local"
tokenizer = "cl100k"
{pricing}

[models.api]
tier = "mid"
service = "cloud"
provider = "cloud"
tokenizer = "cl100k"
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0

[providers.local]
backend = "replay"

[providers.cloud]
backend = "replay"
"""


def write_deploy(path: Path, *, pricing: str = 'hardware = "box"', hardware: str | None = BOUGHT) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "models.toml").write_text(MODELS.format(pricing=pricing))
    if hardware is not None:
        (path / "hardware.toml").write_text(hardware)
    return path


# -- the arithmetic --


@pytest.mark.unit
def test_a_bought_machine_costs_its_amortised_price_plus_power_over_its_useful_tokens(tmp_path):
    path = tmp_path / "hardware.toml"
    path.write_text(BOUGHT)
    [box] = load_profiles(path).values()
    assert box.hardware_usd_per_hour == pytest.approx(0.90)
    assert box.usd_per_hour == pytest.approx(1.00)
    assert box.output_usd_per_mtok == pytest.approx(10 / 9)
    assert box.input_usd_per_mtok == pytest.approx(1 / 9)


@pytest.mark.unit
def test_lifetime_in_years_and_a_rented_machine(tmp_path):
    path = tmp_path / "hardware.toml"
    path.write_text(
        BOUGHT.replace("lifetime_hours = 10000", "lifetime_years = 2").replace(
            "purchase_usd = 9000", "purchase_usd = 17520"
        )
        + "\n[profiles.rented]\nhourly_usd = 3.6\nwatts = 0\nusd_per_kwh = 0\nutilisation = 1.0\n"
        "input_tokens_per_s = 5000\noutput_tokens_per_s = 1000\n"
    )
    profiles = load_profiles(path)
    # $17,520 over 2 x 8,760 h is $1.00/h, plus the $0.10/h of power.
    assert profiles["box"].usd_per_hour == pytest.approx(1.10)
    # $3.60 an hour for 3.6M output tokens: $1 per Mtok; no power bill on top of the rent.
    assert profiles["rented"].output_usd_per_mtok == pytest.approx(1.0)
    assert profiles["rented"].input_usd_per_mtok == pytest.approx(0.2)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("output_tokens_per_s = 500", "", "missing key 'output_tokens_per_s'"),
        ("utilisation = 0.5", "utilization = 0.5", "unknown key 'utilization'"),
        ("utilisation = 0.5", "utilisation = 1.5", "utilisation must be > 0 and <= 1, not 1.5"),
        ("utilisation = 0.5", "utilisation = 0", "utilisation must be > 0 and <= 1, not 0"),
        ("watts = 500", 'watts = "500"', "watts must be a number, not '500'"),
        ("watts = 500", "watts = -1", "watts must be >= 0, not -1"),
        ("output_tokens_per_s = 500", "output_tokens_per_s = 0", "output_tokens_per_s must be > 0"),
        ("lifetime_hours = 10000", "", "set exactly one of 'lifetime_years' or 'lifetime_hours'"),
        ("lifetime_hours = 10000", "lifetime_hours = 10000\nlifetime_years = 1", "set exactly one of"),
        ("purchase_usd = 9000", "hourly_usd = 1.0\npurchase_usd = 9000", "not both ('purchase_usd')"),
        ("purchase_usd = 9000\nlifetime_hours = 10000", "", "missing key 'purchase_usd' (bought) or 'hourly_usd'"),
    ],
)
def test_an_invalid_profile_names_its_file_profile_and_key(tmp_path, old, new, message):
    path = tmp_path / "hardware.toml"
    assert old in BOUGHT
    path.write_text(BOUGHT.replace(old, new))
    with pytest.raises(ValueError) as error:
        load_profiles(path)
    assert str(error.value).startswith(f"{path}: [profiles.box]: ")
    assert message in str(error.value)


# -- the catalogue --


@pytest.mark.unit
def test_a_model_on_a_profile_is_priced_by_it_and_names_it(tmp_path):
    catalog = Catalog.load(write_deploy(tmp_path))
    model, api = catalog.model("m"), catalog.model("api")
    assert (model.hardware, model.input_usd_per_mtok, model.output_usd_per_mtok) == (
        "box",
        pytest.approx(1 / 9),
        pytest.approx(10 / 9),
    )
    assert api.hardware == ""
    # Callers price calls as before: 9,000 input and 900 output tokens are $0.001 each.
    assert model.cost(Usage(input_tokens=9000, output_tokens=900)) == pytest.approx(0.002)


@pytest.mark.unit
def test_a_catalogue_of_list_prices_needs_no_hardware_file(tmp_path):
    prices = "input_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.2"
    catalog = Catalog.load(write_deploy(tmp_path, pricing=prices, hardware=None))
    assert (catalog.model("m").hardware, catalog.model("m").output_usd_per_mtok) == ("", 0.2)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("pricing", "hardware", "message"),
    [
        ('hardware = "box"\noutput_usd_per_mtok = 0.2', BOUGHT, "model m: set hardware or prices, not both"),
        (
            'hardware = "gpu"',
            BOUGHT,
            "model m names hardware 'gpu', which {dir}/hardware.toml does not define (known: box)",
        ),
        ('hardware = "box"', None, "which {dir}/hardware.toml does not define (the file does not exist)"),
        ("input_usd_per_mtok = 0.1", BOUGHT, "model m: set input_usd_per_mtok and output_usd_per_mtok, or hardware"),
        ('hardware = "box"', BOUGHT.replace("watts", "wats"), "[profiles.box]: unknown key 'wats'"),
    ],
)
def test_catalogue_errors_name_the_file_and_model(tmp_path, pricing, hardware, message):
    with pytest.raises(ValueError) as error:
        Catalog.load(write_deploy(tmp_path, pricing=pricing, hardware=hardware))
    assert message.format(dir=tmp_path) in str(error.value)


@pytest.mark.unit
def test_only_a_local_model_is_priced_by_hardware(tmp_path):
    deploy = write_deploy(tmp_path)
    models = deploy / "models.toml"
    models.write_text(
        models.read_text().replace("input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0", 'hardware = "box"')
    )
    with pytest.raises(ValueError, match='model api: hardware prices only models of service = "local"'):
        Catalog.load(deploy)


@pytest.mark.unit
def test_shipped_local_models_are_priced_by_profiles_and_the_gpu_node_stays_the_cheapest():
    catalog = Catalog.load(REPO_DEPLOY_DIR)
    local = catalog.in_tier("local")
    assert {m.name: m.hardware for m in local} == {"mixtral-8x7b-local": "a100x2-rented", "smollm2-135m": "cpu-2core"}
    # The figures deploy/models.toml and the README quote.
    prices = {m.name: (round(m.input_usd_per_mtok, 4), round(m.output_usd_per_mtok, 4)) for m in local}
    assert prices == {"mixtral-8x7b-local": (0.0286, 0.1429), "smollm2-135m": (0.0704, 0.2322)}
    # The router sends local work to the cheapest local model: the replay model the demo runs.
    assert pick_model("local", None, catalog).name == "mixtral-8x7b-local"


# -- the usage row --


@pytest.mark.unit
def test_the_usage_row_carries_the_profile_and_the_spill():
    event = UsageEvent(
        event_id="e", time_ms=0, tenant="acme", task_id="t", step_id="s", call_id="e", service="cloud-inference",
        tier="mid", provider="together", model="mixtral-8x7b", requested_model="mixtral-8x7b", outcome="ok",
        hardware_profile="a100x2-rented", spilled_from="mixtral-8x7b-local",
    )  # fmt: skip
    row = dict(zip(USAGE.columns, usage_row(event), strict=True))
    assert (row["hardware_profile"], row["spilled_from"]) == ("a100x2-rented", "mixtral-8x7b-local")


@pytest.mark.infra
def test_an_existing_usage_table_gains_the_new_columns(ch, settings):
    database = settings.subject_prefix
    create_schema(ch, database)
    ch.command(f"ALTER TABLE {database}.usage_events DROP COLUMN hardware_profile, DROP COLUMN spilled_from")
    ch.command(f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('old', now())")
    create_schema(ch, database)
    columns = [row[0] for row in ch.query(f"DESCRIBE TABLE {database}.usage_events").result_rows]
    # Same order as a new table, so one insert column list serves both.
    assert columns == list(USAGE.columns)
    assert ch.query(f"SELECT hardware_profile, spilled_from FROM {database}.usage_events").result_rows == [("", "")]


@pytest.mark.infra
async def test_a_local_call_lands_a_row_priced_by_its_profile(settings, start_service, nc, ch, data_dir):
    """The real local-inference service and accountant: one ClickHouse row naming the profile,
    costing its tokens at the profile's prices."""
    database = settings.subject_prefix
    await start_service("accountant", settings, database=database)
    await start_service("local-inference", settings)
    model = Catalog.load(REPO_DEPLOY_DIR).model("mixtral-8x7b-local")
    profile = load_profiles(REPO_DEPLOY_DIR / "hardware.toml")[model.hardware]
    record = next(
        r for r in load_recorded_outcomes(data_dir) if r.dataset == "gsm8k" and r.responses.get(model.recorded_as)
    )
    request = InferenceRequest(
        call_id=uuid.uuid4().hex, task_id="task-hw", step_id="answer", tenant="acme", model=model.name,
        tier="local", messages=[ChatMessage(role="user", content=record.prompt)], max_tokens=512,
        deadline_ms=now_ms() + 10_000,
    )  # fmt: skip
    request = granted(request)  # a paid call: it runs on the accountant's grant
    await nc.request(settings.subjects.infer_local(model.name), encode(request), timeout=10)

    query = (
        "SELECT hardware_profile, spilled_from, input_tokens, output_tokens, cost_usd "
        f"FROM {database}.usage_events FINAL WHERE event_id = %(id)s"
    )
    rows = await eventually(
        lambda: ch.query(query, parameters={"id": request.call_id}).result_rows,
        timeout_s=20,
        message="the usage row never reached ClickHouse",
    )
    [(hardware_profile, spilled_from, input_tokens, output_tokens, cost_usd)] = rows
    assert (hardware_profile, spilled_from) == ("a100x2-rented", "")
    assert input_tokens > 0 and output_tokens > 0
    expected = (input_tokens * profile.input_usd_per_mtok + output_tokens * profile.output_usd_per_mtok) / 1_000_000
    assert float(cost_usd) == pytest.approx(expected, rel=0, abs=1e-12) and expected > 0
