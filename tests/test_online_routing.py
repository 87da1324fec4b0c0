"""The online policy (per-tag evidence from shadow labels), the learned policy's fallback to random
routing, `frugalmesh eval routing --online`, the tuning split and router file versions: unit tests,
no process. The mesh's own path (feedback, shadow calls, retraining from ClickHouse, hot reload)
is tests/test_feedback.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import helpers
import numpy as np
import pytest
from click.testing import CliRunner

from schemas.messages import InferenceResult
from services.cli.router_commands import eval_group, router
from services.router.shadow import judge
from services.router_training.dataset import load_outcomes, split_outcomes
from services.router_training.feedback_labels import LabelledPair, train_from_feedback
from services.router_training.online_eval import CallOutcome, tag_hindsight
from services.router_training.training import tag_outcomes, train
from services.router_training.versions import live_version, publish, rollback, version_path, versions
from services.routing.policies import PolicySet
from services.routing.policies.calibration import random_weak_share
from services.routing.policies.learned import LearnedPolicy, prompt_uniform
from services.routing.policies.online import OnlinePolicy, OnlineSettings
from services.routing.policies.routerfile import RouterFile
from services.routing.policies.tags import TagPosterior, TagPrior, plan_weak_shares
from services.routing.table import RoutingTable
from services.runtime.settings import REPO_DEPLOY_DIR

pytestmark = pytest.mark.unit

WEAK = "mixtral-8x7b-local"
STRONG = "gpt-4-1106-preview"
WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"
TRAIN_DOMAINS = ("anatomy", "virology", "college_biology", "econometrics")
STREAM_DOMAINS = ("marketing", "moral_scenarios", "sociology")


def _copy_rows(source: Path, target: Path, rows: int, relabel: random.Random | None = None) -> None:
    """The first ``rows`` rows of a recorded CSV; with ``relabel``, outcomes drawn at random instead
    (weak right 70% of the time, strong 90%), so that nothing in a prompt predicts them."""
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        kept = [row for _, row in zip(range(rows), reader, strict=False)]
        columns = reader.fieldnames or []
    if relabel is not None:
        for row in kept:
            row[WEAK_COLUMN] = str(relabel.random() < 0.7)
            row[STRONG] = str(relabel.random() < 0.9)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(kept)


def _mmlu(data_dir: Path, root: Path, domains: tuple[str, ...], rows: int, relabel: random.Random | None = None):
    for domain in domains:
        name = f"mmlu_{domain}.csv"
        _copy_rows(data_dir / "routing" / "mmlu" / name, root / "mmlu" / name, rows, relabel)
    return root


@pytest.fixture(scope="module")
def mmlu_data(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """MMLU only (no answer text): training domains, and other domains that arrive as traffic."""
    root = tmp_path_factory.mktemp("online")
    return _mmlu(data_dir, root / "train", TRAIN_DOMAINS, 80), _mmlu(data_dir, root / "stream", STREAM_DOMAINS, 100)


@pytest.fixture(scope="module")
def base_router(mmlu_data) -> RouterFile:
    return train(
        load_outcomes(mmlu_data[0]),
        weak_model=WEAK,
        strong_model=STRONG,
        weak_column=WEAK_COLUMN,
        strong_column=STRONG,
        policies=["learned"],
        target=0.95,
    )


def _posteriors(counts: dict[str, list[int]], prior: TagPrior) -> dict[str, TagPosterior]:
    return {tag: TagPosterior.of(np.array(c, dtype=float), prior) for tag, c in counts.items()}


def test_with_no_labels_every_tag_gets_random_routing_calibrated_to_the_target():
    """The fallback for weak evidence: the prior's shares make random routing that meets the target exactly."""
    prior = TagPrior(np.array([0.6, 0.2, 0.05, 0.15]), strength=10.0)
    unseen = TagPosterior.of(np.zeros(4), prior)
    shares = plan_weak_shares({"a": unseen, "b": unseen}, {"a": 3, "b": 1}, target=0.95, caution=0.0)
    strong, weak = 0.6 + 0.2, 0.6 + 0.05
    assert shares["a"] == shares["b"] == pytest.approx((1 - 0.95) * strong / (strong - weak))
    accuracy = shares["a"] * weak + (1 - shares["a"]) * strong
    assert accuracy == pytest.approx(0.95 * strong)
    # Caution keeps fewer calls weak than the mean alone would.
    assert plan_weak_shares({"a": unseen}, {"a": 1}, 0.95, caution=1.0)["a"] < shares["a"]


def test_the_plan_keeps_tags_weak_in_order_of_their_gap_until_the_budget_is_spent():
    prior = TagPrior.fit({"x": np.array([60.0, 20, 5, 15]), "y": np.array([40.0, 40, 5, 15])})
    counts = {"same": [300, 0, 0, 100], "better": [280, 0, 20, 100], "worse": [100, 300, 0, 0], "mid": [250, 80, 0, 70]}
    posteriors = _posteriors(counts, prior)
    shares = plan_weak_shares(posteriors, dict.fromkeys(counts, 1.0), target=0.95, caution=0.5)
    # No worse (or better) on the weak model: always weak; far worse: never while the budget is short.
    assert shares["same"] == shares["better"] == 1.0
    assert shares["worse"] == 0.0
    assert 0.0 < shares["mid"] < 1.0
    expected_loss = sum(shares[t] * (posteriors[t].gap + 0.5 * posteriors[t].gap_sd) for t in counts) / 4
    budget = 0.05 * sum(p.strong_accuracy for p in posteriors.values()) / 4
    assert expected_loss == pytest.approx(budget)


def test_the_online_policy_learns_each_tag_from_shadow_labels_within_its_shadow_share(catalog):
    """Two tags the router never saw: on 'easy' the weak model is always right, on 'hard' never."""
    prior = TagPrior(np.array([0.6, 0.2, 0.05, 0.15]), strength=10.0)
    settings = OnlineSettings(shadow_share=0.1, labels_wanted=40, caution=0.5, retrain_every=20)
    policy = OnlinePolicy(WEAK, STRONG, prior, {}, settings)
    cold = policy.weak_share("easy")
    shadowed: list[tuple[str, str]] = []
    for index in range(2000):
        tag = ("easy", "hard")[index % 2]
        step = helpers.make_step(f"question {index}", workflow=tag)
        routed = policy.choose(step, catalog)
        shadow = policy.shadow_model(step, routed, catalog)
        if shadow is not None:
            shadowed.append((routed.name, shadow.name))
            policy.learn(tag, weak_correct=tag == "easy", strong_correct=True)
        assert policy.shadows <= 0.1 * policy.calls
    assert policy.weak_share("easy") > 0.8 > cold
    assert policy.weak_share("hard") < cold / 2
    # Labels stop once a tag has enough; only a strong call is shadowed, by the cheap weak model.
    assert policy.label_count("easy") == policy.label_count("hard") == 40
    assert set(shadowed) == {(STRONG, WEAK)}


def test_the_per_tag_hindsight_reference_plans_each_tag_with_its_own_outcomes():
    """The ceiling of routing by tag: a tag where the weak model is as good goes wholly weak, the
    worse tag gets what is left of the 5% accuracy budget, and the target is met exactly."""

    def call(tag: str, weak_correct: bool, strong_correct: bool) -> CallOutcome:
        return CallOutcome(
            tag=tag,
            strong=True,
            correct=strong_correct,
            cost_usd=0.1,
            shadow_cost_usd=0.0,
            shadowed=False,
            weak_correct=weak_correct,
            strong_correct=strong_correct,
            strong_cost_usd=0.1,
            weak_cost_usd=0.001,
        )

    same = [call("same", True, True)] * 8 + [call("same", False, False)] * 2
    worse = [call("worse", True, True)] * 5 + [call("worse", False, True)] * 5
    reference = tag_hindsight(same + worse, target=0.95)
    # Strong accuracy 0.9: the budget is 0.045 per call; "worse" loses 0.5 per weak call on half the traffic.
    worse_share = 0.05 * 0.9 / (0.5 * 0.5)
    assert reference.strong_share == pytest.approx((1 - worse_share) / 2)
    assert reference.accuracy == pytest.approx(0.95 * 0.9) and reference.meets_target
    weak_calls = 10 + 10 * worse_share
    assert reference.cost_usd == pytest.approx(weak_calls * 0.001 + (20 - weak_calls) * 0.1)
    assert reference.cost_reduction == pytest.approx(1 - reference.cost_usd / 2.0)


def test_learned_policy_falls_back_to_calibrated_random_routing_when_its_scores_carry_nothing(
    data_dir, tmp_path, catalog
):
    """Outcomes drawn at random: the prompt model cannot beat random routing on held-out folds, so the
    file routes the share random routing may keep weak on every fold, and no more."""
    noise = _mmlu(data_dir, tmp_path, TRAIN_DOMAINS, 80, relabel=random.Random(18))
    records = load_outcomes(noise)
    trained = train(
        records,
        weak_model=WEAK,
        strong_model=STRONG,
        weak_column=WEAK_COLUMN,
        strong_column=STRONG,
        policies=["learned"],
        target=0.95,
    )
    share = trained.prompt_model.random_weak_share
    assert trained.prompt_model.routes_at_random and share >= trained.prompt_model.calibration.weak_share
    policy = LearnedPolicy.from_file(trained)
    weak = [policy.choose(helpers.make_step(r.prompt), catalog).name == WEAK for r in records]
    assert weak == [prompt_uniform(r.prompt) < share for r in records]
    weak_ok = np.array([r.correct[WEAK_COLUMN] for r in records])
    strong_ok = np.array([r.correct[STRONG] for r in records])
    assert random_weak_share(weak_ok, strong_ok, [np.arange(len(records))], 0.95) >= share
    trained.save(tmp_path / "noise.npz")
    loaded = RouterFile.load(tmp_path / "noise.npz")
    assert (loaded.prompt_model.random_weak_share, loaded.prompt_model.routes_at_random) == (share, True)
    assert loaded.tag_outcomes == tag_outcomes(records, WEAK_COLUMN, STRONG)


def test_train_without_policy_on_mmlu_trains_the_learned_policy_and_says_why_the_cascade_was_skipped(
    mmlu_data, tmp_path
):
    out = tmp_path / "router.npz"
    trained = CliRunner().invoke(router, ["train", "--data", str(mmlu_data[0]), "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    assert "cascade skipped" in trained.output and f"{WEAK_COLUMN}_response" in trained.output
    loaded = RouterFile.load(out)
    assert loaded.prompt_model is not None and loaded.answer_model is None
    assert set(loaded.tag_outcomes) == {f"mmlu_{d}" for d in TRAIN_DOMAINS}
    asked = CliRunner().invoke(router, ["train", "--data", str(mmlu_data[0]), "--out", str(out), "--policy", "cascade"])
    assert asked.exit_code != 0 and "no mistralai/Mixtral-8x7B-Instruct-v0.1_response column" in asked.output


def test_eval_routing_online_learns_on_unseen_domains_and_reports_the_last_window(base_router, mmlu_data, tmp_path):
    path = tmp_path / "base.npz"
    base_router.save(path)
    plot = tmp_path / "online.png"
    args = ["routing", "--online", "--router", str(path), "--data", str(mmlu_data[1]), "--json", "--plot", str(plot)]
    result = CliRunner().invoke(eval_group, [*args, "--feedback-share", "0.1", "--retrain-every", "25"])
    assert result.exit_code == 0, result.output
    lines = {r["policy"]: r for r in map(json.loads, result.output.splitlines())}
    online = lines["online"]
    assert {"fixed", "rules", "learned", "random", "oracle", "tag_hindsight"} <= set(lines)
    # Knowing each tag's outcomes, routing by tag keeps at least as many calls weak as one share for all.
    assert lines["tag_hindsight"]["strong_share"] <= lines["random"]["strong_share"] + 1e-9
    assert lines["tag_hindsight"]["meets_target"] and lines["tag_hindsight"]["n"] == 150
    assert online["n"] == 150 and online["stream_n"] == 300 and lines["fixed"]["n"] == 150
    assert online["stream_shadow_share"] <= 0.1 and online["shadow_calls"] > 0
    assert online["cost_reduction"] == pytest.approx(1 - online["cost_usd"] / online["strong_only_cost_usd"])
    assert online["meets_target"] == (online["accuracy"] >= 0.95 * online["strong_accuracy"])
    # The judged window's strong-model figures are the same prompts the references are judged on.
    assert online["strong_only_cost_usd"] == pytest.approx(lines["fixed"]["cost_usd"])
    assert online["strong_accuracy"] == lines["fixed"]["accuracy"]
    assert len(online["curve"]) == 10 and online["curve"][-1]["calls"] == 300
    assert sum(block["shadow_calls"] for block in online["curve"]) == round(online["stream_shadow_share"] * 300)
    assert plot.stat().st_size > 10_000
    seeded = CliRunner().invoke(eval_group, [*args[:-2], "--seed", "0", "--retrain-every", "25"])
    assert json.loads(seeded.output.splitlines()[0]) == online


def test_split_writes_a_tuning_side_apart_from_the_final_hold_out(data_dir, tmp_path):
    source = _mmlu(data_dir, tmp_path / "all", TRAIN_DOMAINS + STREAM_DOMAINS + ("management",), 30)
    counts = split_outcomes(source, tmp_path / "split", "files", test_share=0.25, seed=18, tune_share=0.25)
    sides = {side: {p.name for p in (tmp_path / "split" / side).rglob("*.csv")} for side in counts}
    assert [len(sides[s]) for s in ("train", "tune", "test")] == [4, 2, 2]
    assert not (sides["train"] & sides["tune"] or sides["train"] & sides["test"] or sides["tune"] & sides["test"])
    assert sum(counts.values()) == 8 * 30
    again = split_outcomes(source, tmp_path / "again", "files", test_share=0.25, seed=18, tune_share=0.25)
    assert again == counts and {p.name for p in (tmp_path / "again" / "test").rglob("*.csv")} == sides["test"]


def test_router_file_versions_are_kept_and_any_can_be_made_live_again(base_router, tmp_path):
    live = tmp_path / "routers" / "online.npz"
    for labels in (10, 20, 30):
        publish(dataclasses.replace(base_router, provenance={"labels": {"pairs": labels}}), live)
    assert list(versions(live)) == [1, 2, 3] and live_version(live) == 3
    assert RouterFile.load(live).provenance == {"labels": {"pairs": 30}, "version": 3}
    assert rollback(live) == 2 and live_version(live) == 2
    assert RouterFile.load(live).provenance["labels"]["pairs"] == 20
    assert rollback(live, to=3) == 3 and live_version(live) == 3
    with pytest.raises(ValueError, match="no version 7"):
        rollback(live, to=7)
    assert version_path(live, 12).name == "online.v0012.npz"
    assert not list(live.parent.glob(".*.tmp"))


def test_the_final_hold_out_of_docs_routing_md_is_fixed(data_dir, tmp_path):
    """The domain split the online figures were tuned and judged on (docs/routing.md, "Learning from
    the mesh's traffic"): seed 18, a quarter of the MMLU domains to tune design choices on, a quarter
    held out to the end. A change to the split's code that moved a domain would silently mix them."""
    counts = split_outcomes(data_dir / "routing" / "mmlu", tmp_path, "files", test_share=0.25, seed=18, tune_share=0.25)
    domains = {side: sorted(p.stem.removeprefix("mmlu_") for p in (tmp_path / side).glob("*.csv")) for side in counts}
    assert domains["tune"] == [
        "clinical_knowledge",
        "high_school_geography",
        "high_school_microeconomics",
        "human_aging",
        "human_sexuality",
        "marketing",
        "miscellaneous",
        "moral_disputes",
    ]
    assert domains["test"] == [
        "anatomy",
        "business_ethics",
        "college_chemistry",
        "international_law",
        "jurisprudence",
        "medical_genetics",
        "professional_psychology",
        "world_religions",
    ]
    assert counts == {"train": 4152, "test": 1446, "tune": 2417}


def test_routing_toml_selects_the_online_policy_with_its_settings(base_router, tmp_path, catalog):
    base_router.save(tmp_path / "routers" / "online.npz")
    table = RoutingTable.load(REPO_DEPLOY_DIR)
    spec = {"router": "routers/online.npz", "workflows": {"answer": "online"}, "online": {"shadow_share": 0.2}}
    policies = PolicySet.parse({"policies": spec}, table, catalog, tmp_path)
    online = policies.for_step(helpers.make_step("q", workflow="answer"))
    assert isinstance(online, OnlinePolicy) and online.settings.shadow_share == 0.2
    assert policies.for_step(helpers.make_step("q", workflow="other")) is table
    assert policies.router_file == tmp_path / "routers" / "online.npz"
    with pytest.raises(ValueError, match="shadow_share is a share"):
        PolicySet.parse({"policies": {**spec, "online": {"shadow_share": 2}}}, table, catalog, tmp_path)
    with pytest.raises(ValueError, match="shadow_shares"):
        PolicySet.parse({"policies": {**spec, "online": {"shadow_shares": 0.1}}}, table, catalog, tmp_path)


def test_a_tenant_or_workflow_may_have_its_own_shadow_share(catalog):
    prior = TagPrior(np.array([0.6, 0.2, 0.05, 0.15]), strength=10.0)
    settings = OnlineSettings(shadow_share=0.05, tenants={"acme": 0.5}, workflows={"quiet": 0.0}, labels_wanted=10**6)
    policy = OnlinePolicy(WEAK, STRONG, prior, {}, settings)
    shadows = {"acme": 0, "other": 0, "quiet": 0}
    for index in range(600):
        who = ("acme", "other", "quiet")[index % 3]
        step = helpers.make_step(f"q{index}", tenant=who if who != "quiet" else "other", workflow=who)
        if policy.shadow_model(step, policy.choose(step, catalog), catalog) is not None:
            shadows[who] += 1
    assert policy.scope_shadows["tenant:acme"] == shadows["acme"] <= 0.5 * 200
    assert shadows["acme"] > 60 and shadows["quiet"] == 0
    assert shadows["other"] == policy.scope_shadows[""] <= 0.05 * 200


def test_a_shadow_pair_is_judged_by_recorded_grades_else_by_the_validator():
    """The shipped router file holds the cascade's validator: without recorded grades it judges the
    weak answer, the strong one being its reference."""
    policy = OnlinePolicy.from_file(RouterFile.load(REPO_DEPLOY_DIR / "routers" / "mixtral-gpt4.npz"), OnlineSettings())

    def answer(model: str, output: str, graded: bool | None = None) -> InferenceResult:
        return InferenceResult(call_id=model, model=model, tier="local", output=output, graded=graded)

    good = "She has 16 - 3 = <<16-3=13>>13 eggs, sold at $2: 13 * 2 = <<13*2=26>>26.\n#### 26"
    assert judge(policy, answer(STRONG, "x", True), answer(WEAK, "y", False)) == (False, True, "label")
    assert judge(policy, answer(WEAK, "y", True), answer(STRONG, "x", False)) == (True, False, "label")
    assert judge(policy, answer(STRONG, "#### 26"), answer(WEAK, good)) == (True, True, "validator")
    assert judge(policy, answer(STRONG, "#### 26"), answer(WEAK, "I am not sure; it depends.")) == (
        False,
        True,
        "validator",
    )
    policy.validator = None
    assert judge(policy, answer(STRONG, "#### 26"), answer(WEAK, good)) is None


def test_labels_from_clickhouse_are_added_to_the_base_file_with_held_out_figures(base_router, tmp_path):
    """`router train --from-clickhouse` without ClickHouse: the pairs it read, added to the base file's
    outcomes; the plan from the older 80% of them judged on the newest 20%."""
    start = datetime(2026, 12, 1, tzinfo=UTC)
    pairs = [
        LabelledPair(
            tag,
            weak_correct=tag == "easy" or index % 3 == 0,
            strong_correct=True,
            time=start + timedelta(minutes=index),
        )
        for index, tag in enumerate(["easy", "hard"] * 60)
    ]
    trained = train_from_feedback(base_router, tmp_path / "base.npz", pairs, OnlineSettings())
    assert trained.tag_outcomes["easy"] == [60, 0, 0, 0] and sum(trained.tag_outcomes["hard"]) == 60
    assert {t: trained.tag_outcomes[t] for t in base_router.tag_outcomes} == base_router.tag_outcomes
    provenance = trained.provenance
    assert provenance["labels"] == {
        "pairs": 120,
        "first": start.isoformat(),
        "last": (start + timedelta(minutes=119)).isoformat(),
        "by_tag": {"easy": 60, "hard": 60},
    }
    held_out = provenance["held_out"]
    assert held_out["pairs"] == 24 and held_out["meets_target"]
    assert held_out["strong_accuracy"] == 1.0 and 0.5 < held_out["weak_share"] < 1.0
    few = train_from_feedback(base_router, tmp_path / "base.npz", pairs[:50], OnlineSettings())
    assert few.provenance["held_out"] == {"pairs": 10, "note": "fewer than 20 newest pairs: not judged"}
