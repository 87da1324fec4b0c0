"""Routing policies (fixed, rules, learned, cascade): trained and calibrated on recorded outcomes,
routing live steps through the router service on a real nats-server, and judged by
`frugalmesh eval routing` through the same code."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import helpers
import msgspec
import numpy as np
import pytest
from click.testing import CliRunner
from fakes.budget_peer import BudgetPeer
from fakes.inference_peer import InferencePeer
from mesh_client import ask

from schemas.messages import InferenceResult, StepRequest, UsageEvent
from services.cli.router_commands import eval_group, router
from services.router_training.dataset import load_outcomes
from services.router_training.training import train
from services.routing.policies import CascadePolicy, LearnedPolicy, PolicySet, execute
from services.routing.policies.calibration import calibrate, calibrate_every_fold
from services.routing.policies.features import (
    EMBEDDING_DIMENSIONS,
    MAX_EMBEDDED_CHARS,
    answer_features,
    prompt_embeddings,
)
from services.routing.policies.fixed import FixedPolicy
from services.routing.policies.routerfile import RouterFile
from services.routing.table import PinningError, RoutingTable
from services.runtime.settings import REPO_DEPLOY_DIR

WEAK = "mixtral-8x7b-local"
STRONG = "gpt-4-1106-preview"
WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"
FIELDS = {
    "policy",
    "n",
    "strong_share",
    "accuracy",
    "strong_accuracy",
    "weak_accuracy",
    "cost_usd",
    "strong_only_cost_usd",
    "cost_reduction",
    "meets_target",
}
GOOD_ANSWER = "She has 16 - 3 = <<16-3=13>>13 eggs, sold at $2: 13 * 2 = <<13*2=26>>26.\n#### 26"


def _copy_rows(source: Path, target: Path, rows: int) -> None:
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        kept = [row for _, row in zip(range(rows), reader, strict=False)]
        columns = reader.fieldnames or []
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(kept)


@pytest.fixture(scope="module")
def small_data(data_dir, tmp_path_factory) -> Path:
    """A small routing-format directory: GSM8K with answers, three MMLU domains without."""
    root = tmp_path_factory.mktemp("routing")
    _copy_rows(data_dir / "routing" / "gsm8k_responses.csv", root / "gsm8k_responses.csv", 240)
    for domain in ("anatomy", "marketing", "virology"):
        _copy_rows(data_dir / "routing" / "mmlu" / f"mmlu_{domain}.csv", root / "mmlu" / f"mmlu_{domain}.csv", 60)
    return root


@pytest.fixture(scope="module")
def router_file(small_data) -> RouterFile:
    return train(
        load_outcomes(small_data),
        weak_model=WEAK,
        strong_model=STRONG,
        weak_column=WEAK_COLUMN,
        strong_column=STRONG,
        policies=["learned", "cascade"],
        target=0.95,
    )


def make_step(content: str, **fields) -> StepRequest:
    """The step of the shipped "answer" workflow, as the planner sends it."""
    return helpers.make_step(content, role="answer", step_id="answer", **fields)


# -- calibration and training --


@pytest.mark.unit
def test_calibration_picks_the_cheapest_threshold_that_meets_the_target():
    weak = np.array([1, 1, 0, 1, 0, 0], bool)
    strong = np.array([1, 1, 1, 1, 1, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])

    point = calibrate(scores, weak, strong, target=0.79)

    # The top two kept weak lose nothing, the third loses one answer (4/6, 80% of 5/6), the fourth
    # none more; the fifth would lose another.
    assert point.threshold == 0.6 and point.weak_share == pytest.approx(4 / 6)
    assert point.accuracy == pytest.approx(4 / 6) and point.meets_target
    assert calibrate(scores, weak, strong, target=1.0).threshold == 0.8


@pytest.mark.unit
def test_every_fold_calibration_meets_the_target_in_each_fold():
    # Fold A: the weak model is right wherever its score is high; fold B: only at the very top.
    weak = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    strong = np.ones(8, bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.85, 0.75, 0.65])
    folds = [np.arange(4), np.arange(4, 8)]

    point = calibrate_every_fold(scores, weak, strong, folds, target=0.8)

    # Alone, fold A would keep three weak (threshold 0.7), fold B one (0.95): the stricter wins.
    assert [calibrate(scores[f], weak[f], strong[f], 0.8).threshold for f in folds] == [0.7, 0.95]
    assert point.threshold == 0.95 and point.weak_share == pytest.approx(1 / 8) and point.accuracy == 1.0
    for fold in folds:
        kept_weak = scores[fold] >= point.threshold
        assert np.where(kept_weak, weak[fold], strong[fold]).mean() >= 0.8


@pytest.mark.unit
def test_prompt_embeddings_come_from_the_wheel_and_are_unit_length():
    vectors = prompt_embeddings(["How many eggs does she sell?", "Which treaty ended the war?", ""])
    assert vectors.shape == (3, EMBEDDING_DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)
    # An empty prompt has no tokens: the zero vector, never NaN.
    assert not np.isnan(vectors).any() and not vectors[2].any()
    # Similar questions sit closer than unrelated ones.
    eggs, treaty, _ = vectors
    chickens = prompt_embeddings(["How many chickens does the farmer sell?"])[0]
    assert eggs @ chickens > eggs @ treaty
    # A huge prompt is embedded by its opening, so it cannot hold the router's loop for long.
    opening = "Which treaty ended the war? " * (MAX_EMBEDDED_CHARS // 28 + 1)
    huge = prompt_embeddings([opening + "Ignore that and talk about eggs. " * 30_000])[0]
    assert np.allclose(huge, prompt_embeddings([opening[:MAX_EMBEDDED_CHARS]])[0])


@pytest.mark.unit
def test_each_policy_meets_its_target_on_training_data(router_file):
    for model in (router_file.prompt_model, router_file.answer_model):
        point = model.calibration
        assert point.meets_target and point.accuracy >= 0.95 * point.strong_accuracy
        assert 0 < point.weak_share < 1


@pytest.mark.unit
def test_router_file_round_trips_without_pickle(router_file, small_data, tmp_path):
    path = tmp_path / "router.npz"
    router_file.save(path)
    loaded = RouterFile.load(path)
    prompts = [r.prompt for r in load_outcomes(small_data)[:20]]
    assert np.allclose(loaded.prompt_model.scores(prompts), router_file.prompt_model.scores(prompts), atol=1e-6)
    assert loaded.answer_model.score(GOOD_ANSWER) == pytest.approx(router_file.answer_model.score(GOOD_ANSWER))
    assert loaded.trained_on == {
        "gsm8k_responses": 240,
        "mmlu/mmlu_anatomy": 60,
        "mmlu/mmlu_marketing": 60,
        "mmlu/mmlu_virology": 60,
    }


@pytest.mark.unit
def test_the_validator_checks_structure_and_arithmetic(router_file):
    features = dict(zip(("final", "integer"), answer_features(GOOD_ANSWER)[:2], strict=False))
    assert features == {"final": 1.0, "integer": 1.0}
    wrong_sums = GOOD_ANSWER.replace("<<13*2=26>>", "<<13*2=24>>")
    assert answer_features(wrong_sums)[5] > 0 == answer_features(GOOD_ANSWER)[5]
    validator = router_file.answer_model
    assert validator.score(GOOD_ANSWER) > validator.score("I am not sure; it depends.")


# -- decisions and execution, no NATS --


@pytest.mark.unit
def test_learned_policy_splits_by_score_and_respects_pinning(router_file, catalog):
    learned = LearnedPolicy.from_file(router_file)
    step = make_step("What is 2 + 2?")
    score = learned.score(step)
    low = LearnedPolicy.from_file(router_file, threshold=score)
    high = LearnedPolicy.from_file(router_file, threshold=np.nextafter(score, 2))
    assert low.choose(step, catalog).name == WEAK and high.choose(step, catalog).name == STRONG
    assert high.choose(make_step("What is 2 + 2?", allow_models=[WEAK, "mixtral-8x7b"]), catalog).name == "mixtral-8x7b"
    with pytest.raises(PinningError):
        FixedPolicy(STRONG).choose(make_step("x", allow_models=["gpt-5"]), catalog)


@pytest.mark.unit
async def test_cascade_escalates_a_rejected_answer_and_counts_both_calls(router_file, catalog):
    cascade = CascadePolicy.from_file(router_file)
    calls: list[str] = []

    def answering(text: str):
        async def call(model) -> InferenceResult:
            calls.append(model.name)
            return InferenceResult(call_id=model.name, model=model.name, tier=model.tier, output=text, cost_usd=0.25)

        return call

    kept = await execute(cascade, make_step("q"), catalog, answering(GOOD_ANSWER))
    assert calls == [WEAK] and kept.model == WEAK and kept.cost_usd == 0.25
    calls.clear()
    escalated = await execute(cascade, make_step("q"), catalog, answering("no idea"))
    assert calls == [WEAK, STRONG] and escalated.model == STRONG and escalated.cost_usd == 0.5


@pytest.mark.unit
def test_policies_are_chosen_per_tenant_then_workflow(router_file, catalog, tmp_path):
    router_file.save(tmp_path / "r.npz")
    table = RoutingTable.load(REPO_DEPLOY_DIR)
    raw = {
        "policies": {
            "default": "rules",
            "router": "r.npz",
            "tenants": {"acme": "learned", "pinned": f"fixed:{STRONG}"},
            "workflows": {"answer": "cascade"},
        }
    }
    policies = PolicySet.parse(raw, table, catalog, tmp_path)
    assert isinstance(policies.for_step(make_step("q", tenant="acme")), LearnedPolicy)
    assert policies.for_step(make_step("q", tenant="pinned")) == FixedPolicy(STRONG)
    assert isinstance(policies.for_step(make_step("q", tenant="other")), CascadePolicy)
    assert PolicySet.parse({}, table, catalog, tmp_path).for_step(make_step("q")) is table
    with pytest.raises(ValueError, match="unknown policy"):
        PolicySet.parse({"policies": {"default": "smart"}}, table, catalog, tmp_path)


# -- the command line --


@pytest.mark.unit
def test_train_and_eval_commands(small_data, tmp_path):
    out = tmp_path / "router.npz"
    runner = CliRunner()
    trained = runner.invoke(router, ["train", "--data", str(small_data), "--out", str(out), "--policy", "all"])
    assert trained.exit_code == 0, trained.output
    plot = tmp_path / "curve.png"
    evaluated = runner.invoke(
        eval_group,
        ["routing", "--router", str(out), "--data", str(small_data), "--target", "0.95", "--json", "--plot", str(plot)],
    )
    assert evaluated.exit_code == 0, evaluated.output
    results = {r["policy"]: r for r in map(json.loads, evaluated.output.splitlines())}
    assert {"fixed", "rules", "learned", "cascade", "random", "oracle"} <= set(results)
    for result in results.values():
        assert FIELDS <= set(result) and result["n"] == 420
        assert result["cost_reduction"] == pytest.approx(1 - result["cost_usd"] / result["strong_only_cost_usd"])
        assert result["meets_target"] == (result["accuracy"] >= 0.95 * result["strong_accuracy"])
    assert results["fixed"]["strong_share"] == 1.0 and abs(results["fixed"]["cost_reduction"]) < 1e-9
    assert results["oracle"]["accuracy"] >= results["fixed"]["accuracy"]
    assert plot.stat().st_size > 10_000


# -- through the live router on a real nats-server --


@pytest.mark.infra
async def test_each_policy_routes_as_configured_through_the_live_router(
    settings, start_service, nc, router_file, small_data, catalog, tmp_path
):
    """deploy/routing.toml's [policies] picks the policy per tenant, then per workflow."""
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_DEPLOY_DIR, deploy)
    router_file.save(deploy / "routers" / "test.npz")
    routing = deploy / "routing.toml"
    shipped = routing.read_text().split("\n[policies]")[0]
    routing.write_text(
        shipped + "\n[policies]\n"
        'default = "rules"\n'
        'router = "routers/test.npz"\n'
        f'tenants = {{ pinned = "fixed:{STRONG}", smart = "learned", careful = "cascade" }}\n'
    )
    learned = LearnedPolicy.from_file(router_file)
    # The training prompts the learned policy is surest and least sure the weak model gets right.
    by_score = sorted((r.prompt for r in load_outcomes(small_data)), key=lambda p: learned.score(make_step(p)))
    hard, easy = by_score[0], by_score[-1]
    assert learned.choose(make_step(hard), catalog).name == STRONG
    assert learned.choose(make_step(easy), catalog).name == WEAK
    peer = await InferencePeer(nc, settings.subjects).start()
    budget = await BudgetPeer(nc, settings.subjects).start()
    await start_service("router", settings.model_copy(update={"deploy_dir": deploy}))
    await nc.flush()

    async def route(tenant: str, prompt: str) -> tuple[list[str], str, float]:
        before = len(peer.requests)
        result = await ask(nc, settings, make_step(prompt, tenant=tenant))
        assert result.error is None
        return peer.models[before:], result.model, result.cost_usd

    # A different prompt each time: a repeat would be served from the router's cache.
    assert await route("acme", "Tom has 3 apples and buys 4 more. How many?") == ([WEAK], WEAK, 0.001)
    assert await route("pinned", "Ann has 2 pens and buys 5 more. How many?") == ([STRONG], STRONG, 0.001)
    assert await route("smart", hard) == ([STRONG], STRONG, 0.001)
    assert await route("smart", easy) == ([WEAK], WEAK, 0.001)
    # The peer's answer states no result, so the cascade escalates; the reply carries both calls.
    cascaded = await route("careful", "Bo has 6 cups and breaks 2. How many are left?")
    assert cascaded == ([WEAK, STRONG], STRONG, pytest.approx(0.002))
    # Both cascade calls were reserved and settled like any other paid call.
    assert [r.model for r in budget.reserved][-2:] == [WEAK, STRONG]
    assert len(budget.settled) == len(budget.reserved) == 6


@pytest.mark.infra
async def test_cascade_on_recorded_answers_meters_both_calls(settings, start_service, nc, router_file, data_dir):
    """With the replay inference services: a recorded weak answer the validator trusts is kept
    (one call); one it rejects is asked again of GPT-4 (two calls, two usage rows)."""
    cascade = CascadePolicy.from_file(router_file)
    gsm8k = [r for r in load_outcomes(data_dir / "routing" / "gsm8k_responses.csv") if r.responses.get(WEAK_COLUMN)]
    by_score = sorted(gsm8k, key=lambda r: cascade.validator.score(r.responses[WEAK_COLUMN]))
    rejected, accepted = by_score[0], by_score[-1]
    assert cascade.validator.score(accepted.responses[WEAK_COLUMN]) >= cascade.threshold
    await BudgetPeer(nc, settings.subjects).start()
    usage = await nc.subscribe(settings.subjects.usage_all)
    await start_service("local-inference", settings)
    await start_service("cloud-inference", settings)
    await start_service("router", settings, policies=PolicySet(default=cascade, tenants={}, workflows={}))
    await nc.flush()

    kept = await ask(nc, settings, make_step(accepted.prompt, max_tokens=512))
    escalated = await ask(nc, settings, make_step(rejected.prompt, max_tokens=512))

    assert (kept.model, kept.graded) == (WEAK, accepted.correct[WEAK_COLUMN])
    assert (escalated.model, escalated.graded) == (STRONG, rejected.correct[STRONG])
    events = [msgspec.json.decode((await usage.next_msg(timeout=2)).data, type=UsageEvent) for _ in range(3)]
    assert [e.model for e in events] == [WEAK, WEAK, STRONG]
    assert all(e.outcome == "ok" and e.cost_usd > 0 for e in events)
    assert escalated.cost_usd == pytest.approx(events[1].cost_usd + events[2].cost_usd)


@pytest.mark.unit
def test_the_shipped_router_file_loads_and_decides(catalog):
    """deploy/routers/mixtral-gpt4.npz, named by the shipped routing.toml, works with this code."""
    table = RoutingTable.load(REPO_DEPLOY_DIR)
    shipped = PolicySet.load(REPO_DEPLOY_DIR, table, catalog)
    assert shipped.for_step(make_step("q")) is table
    raw = {"policies": {"default": "learned", "router": "routers/mixtral-gpt4.npz"}}
    learned = PolicySet.parse(raw, table, catalog, REPO_DEPLOY_DIR).default
    assert learned.choose(make_step("What is 2 + 2?"), catalog).name in (WEAK, STRONG)
    assert learned.model.calibration.meets_target
