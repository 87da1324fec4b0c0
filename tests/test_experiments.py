"""`frugalmesh experiment`: the seeds' experiments run through a real mesh (its services as processes on
the session's nats-server and ClickHouse) on recorded outcomes, at tiny sizes; what a reader of their
tables relies on holds: paired arms compare like with like, a budget is never overrun, a cache hit
replays the same answer, and every command writes its plot."""

from __future__ import annotations

import tomllib

import pytest
from click.testing import CliRunner

from services.cli.main import cli
from services.economics import experiments_budget, experiments_chain, experiments_levers
from services.economics.experiments_levers import retry_model
from services.economics.mesh import experiment_deploy
from services.planner.config import PlannerConfig
from services.routing.policies import PolicySet
from services.routing.policies.cascade import CascadePolicy
from services.routing.table import RoutingTable
from services.runtime.catalog import Catalog
from services.runtime.settings import REPO_DEPLOY_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def servers(infra, monkeypatch):
    """The experiment's own stack runs on the session's servers (it starts only the services)."""
    monkeypatch.setenv("NATS_URL", infra[0])
    monkeypatch.setenv("CLICKHOUSE_URL", infra[1])


def spy(monkeypatch, module, name: str) -> dict:
    """Keep what ``module.name`` returns when the command calls it, to check the figures it printed."""
    kept: dict = {}
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda options: kept.setdefault("result", original(options)))
    return kept


def run(*args: str) -> str:
    outcome = CliRunner().invoke(cli, ["experiment", *args], catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output
    return outcome.output


@pytest.mark.unit
def test_the_experiment_deploy_sets_replay_latency_and_arm_policies(tmp_path):
    deploy = experiment_deploy(tmp_path / "deploy", 0.5, {"arm-x": "cascade"})
    catalog = Catalog.load(deploy)
    planner = PlannerConfig.load(deploy)
    for model in catalog.models.values():
        expected = planner.models[model.name].latency_s * 500 if model.recorded_as else 0
        assert model.ttft_ms == pytest.approx(expected), model.name
    assert tomllib.loads((deploy / "routing.toml").read_text())["policies"]["tenants"] == {"arm-x": "cascade"}
    policies = PolicySet.load(deploy, RoutingTable.load(deploy), catalog)
    assert isinstance(policies.tenants["arm-x"], CascadePolicy)
    # No latency asked: the copy's models answer at once, as deploy/'s do.
    plain = Catalog.load(experiment_deploy(tmp_path / "plain", 0.0, {}))
    assert all(model.ttft_ms == 0 for model in plain.models.values())


@pytest.mark.unit
def test_a_retry_goes_to_a_model_whose_recorded_answer_differs():
    catalog = Catalog.load(REPO_DEPLOY_DIR)
    assert retry_model(catalog, "gpt-4-1106-preview") == "mixtral-8x7b-local"
    assert retry_model(catalog, "mixtral-8x7b") == "gpt-4-1106-preview"


@pytest.mark.unit
def test_mistakes_say_what_was_wrong_and_how_to_fix_it(data_dir):
    runner = CliRunner()
    bad_steps = runner.invoke(cli, ["experiment", "reliability-cliff", "--steps", "0,x"])
    assert bad_steps.exit_code == 2 and "chain lengths of 1 or more" in bad_steps.output
    too_many = runner.invoke(
        cli, ["experiment", "reliability-cliff", "--dataset", "gsm8k", "--chains", "100", "--data", str(data_dir)]
    )
    assert too_many.exit_code == 1 and "distinct prompts" in too_many.output and "ask for fewer" in too_many.output
    bad_budget = runner.invoke(cli, ["experiment", "budget-sweep", "--budgets", "1,-1"])
    assert bad_budget.exit_code == 2 and "above 0" in bad_budget.output


@pytest.mark.infra
@pytest.mark.slow
def test_reliability_cliff_measures_paired_chains(servers, data_dir, tmp_path, monkeypatch):
    kept = spy(monkeypatch, experiments_chain, "reliability_cliff")
    out = tmp_path / "cliff.png"
    output = run("reliability-cliff", "--steps", "1,3", "--chains", "5", "--data", str(data_dir), "--out", str(out))
    result = kept["result"]
    assert "reliability cliff" in output and "extra calls / point" in output
    assert out.read_bytes().startswith(PNG_MAGIC)
    for length in (1, 3):
        weak, escalate = result.point("weak", length), result.point("escalate", length)
        # The same chains, and escalation only adds a second chance: it never ends fewer chains well.
        assert weak.chains == escalate.chains == 5
        assert escalate.succeeded >= weak.succeeded
    weak, escalate, cascade = result.arm("weak"), result.arm("escalate"), result.arm("cascade")
    assert weak.calls_per_step == 1.0  # one answered call per step, read from the accountant's rows
    assert 1.0 <= escalate.calls_per_step <= 2.0 and 1.0 <= cascade.calls_per_step <= 2.0
    assert escalate.success >= weak.success
    assert 0.0 < result.p_weak < result.p_strong < 1.0


@pytest.mark.infra
@pytest.mark.slow
def test_levers_run_beside_the_formula(servers, data_dir, tmp_path, monkeypatch):
    kept = spy(monkeypatch, experiments_levers, "levers")
    out = tmp_path / "levers.png"
    args = ("--jobs", "2", "--steps", "4", "--time-scale", "0.1", "--data", str(data_dir), "--out", str(out))
    output = run("levers", *args)
    result = kept["result"]
    assert "levers" in output and out.read_bytes().startswith(PNG_MAGIC)
    assert [row.lever for row in result.rows] == [lever.name for lever in experiments_levers.LEVERS]
    base, parallel, cache = result.row("baseline"), result.row("parallelise"), result.row("cache")
    # Parallel runs the same calls, sooner.
    assert parallel.cost_usd == pytest.approx(base.cost_usd) and parallel.succeeded == base.succeeded
    assert parallel.latency_s < base.latency_s and parallel.predicted_latency_s < base.predicted_latency_s
    # Half the steps are cache hits: no call, no cost, and the same answer, right or wrong.
    assert cache.cache_hits == 2 and cache.calls == 2 and cache.cost_usd < base.cost_usd
    assert cache.succeeded == base.succeeded
    assert result.row("retry").succeeded >= base.succeeded
    assert result.row("cut steps").steps == 2 and result.row("retry").calls >= base.calls


@pytest.mark.infra
@pytest.mark.slow
def test_a_budget_aware_run_never_overruns(servers, data_dir, tmp_path, monkeypatch):
    kept = spy(monkeypatch, experiments_budget, "budget_sweep")
    out = tmp_path / "budget.png"
    args = ("--jobs", "2", "--steps", "3", "--budgets", "16,1,0.01", "--data", str(data_dir), "--out", str(out))
    output = run("budget-sweep", *args)
    result = kept["result"]
    assert "budget sweep" in output and out.read_bytes().startswith(PNG_MAGIC)
    assert [row.multiple for row in result.rows] == [16, 1, 0.01]
    for row in result.rows:
        assert row.max_cost_usd <= row.budget_usd
        assert row.overrun == pytest.approx(result.ignoring_cost_usd / row.budget_usd)
    # The tighter the budget, the fewer questions it pays for.
    tightest = result.rows[-1]
    assert tightest.answered <= result.rows[0].answered and tightest.quality <= tightest.answered
