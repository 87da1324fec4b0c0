"""The pre-flight estimate reproduces the reference table of the design, figure for figure; the
planner's estimate of a real workflow prices it on the models, prices and recorded accuracies it
would run with; `frugalmesh estimate` prints it.

Reference profiles: premium $0.030, 2.0 s, p=0.985 per call; small $0.002, 0.4 s, p=0.945; a
cached step costs $0, takes 0.01 s and always succeeds. Every row builds its plan with the public
API and compares the figures rounded as the table shows them.

Two rows fix how routing and caching combine, and the figures leave one reading each:

- "all routed to small" ($0.136, 9.6 s, 59.87%). The cost admits only 4 premium + 8 small calls
  with no cache hit (0.028 x premium calls = 0.136 - 12 x 0.002), the reliability 0.985^4 x
  0.945^8 = 59.87% admits no retry, and 9.6 s = 4 x 2.0 + 4 x 0.4 needs the 4 premium steps on 4
  separate levels and the 8 small steps on only 4 more. The router cannot send every step to the
  small model: the chain is 4 stages, each two simple context-reduction steps (filter, classify:
  cascade-routed to small) feeding one synthesis step (kept on premium). The two reductions of a
  stage need only the previous synthesis, not each other, so they run side by side:
  levels (S S)(P)(S S)(P)(S S)(P)(S S)(P) = 4 x (0.4 + 2.0) = 9.6 s.
- "6 steps, parallel, 2 premium + 4 small, cached, retried" ($0.008, 0.4 s, 98.80%). $0.008 is
  exactly the 4 small calls, so the 2 premium steps are the cache hits; 0.4 s puts all 6 on one
  level; and only one retry per small step gives (1 - 0.055^2)^4 = 98.80% (none: 79.75%, two:
  99.93%). Every step is retried once: on the cached premium steps that changes nothing, since a
  cache hit always succeeds.

Retries are not counted in cost (nor latency): "each step retried once" keeps $0.360 and 24.0 s.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.cli.estimate_command import estimate as estimate_command
from services.planner.config import Limits, PlannerConfig
from services.planner.estimate import (
    CallProfile,
    Group,
    Plan,
    PlanEstimate,
    Step,
    estimate,
    fits,
    plan_from_dag,
)
from services.planner.preflight import Preflight, describe
from services.planner.workflow import load_workflows
from services.routing.table import PinningError
from services.runtime.data import load_recorded_outcomes

pytestmark = pytest.mark.unit

PREMIUM = CallProfile(cost_usd=0.030, latency_s=2.0, p_success=0.985)
SMALL = CallProfile(cost_usd=0.002, latency_s=0.4, p_success=0.945)


def sequential(steps: list[Step]) -> Plan:
    return Plan(tuple(Group((step,)) for step in steps))


def parallel(steps: list[Step]) -> Plan:
    return Plan((Group(tuple(steps)),))


def routed_to_small() -> Plan:
    """4 stages of (filter, classify) on the small model feeding a premium synthesis; see the module doc."""
    dag: list[tuple[str, list[str], Step]] = []
    previous: list[str] = []
    for stage in range(4):
        reductions = [f"filter{stage}", f"classify{stage}"]
        dag += [(step_id, previous, Step(profile=SMALL)) for step_id in reductions]
        dag.append((f"synthesise{stage}", reductions, Step(profile=PREMIUM)))
        previous = [f"synthesise{stage}"]
    return plan_from_dag(dag)


def row(plan: Plan) -> tuple[str, str, str, str]:
    """The estimate of ``plan`` written as the reference table writes it."""
    e = estimate(plan)
    return (f"${e.cost_usd:.3f}", f"{e.latency_s:.1f} s", f"{e.reliability * 100:.2f}%", f"{e.quality_per_usd:.1f}")


REFERENCE_TABLE = [
    ("1 premium call", lambda: sequential([Step(profile=PREMIUM)]), ("$0.030", "2.0 s", "98.50%", "32.8")),
    (
        "12 steps, sequential, premium",
        lambda: sequential([Step(profile=PREMIUM)] * 12),
        ("$0.360", "24.0 s", "83.41%", "2.3"),
    ),
    ("same, parallelised", lambda: parallel([Step(profile=PREMIUM)] * 12), ("$0.360", "2.0 s", "83.41%", "2.3")),
    ("same, all routed to small", routed_to_small, ("$0.136", "9.6 s", "59.87%", "4.4")),
    (
        "same, 6 of 12 steps cached",
        lambda: sequential([Step(profile=PREMIUM, cached=True)] * 6 + [Step(profile=PREMIUM)] * 6),
        ("$0.180", "12.1 s", "91.33%", "5.1"),
    ),
    (
        "same, each step retried once",
        lambda: sequential([Step(profile=PREMIUM, retries=1)] * 12),
        ("$0.360", "24.0 s", "99.73%", "2.8"),
    ),
    ("cut to 6 steps", lambda: sequential([Step(profile=PREMIUM)] * 6), ("$0.180", "12.0 s", "91.33%", "5.1")),
    (
        "6 steps, parallel, 2 premium + 4 small, cached, retried",
        lambda: parallel([Step(profile=PREMIUM, cached=True, retries=1)] * 2 + [Step(profile=SMALL, retries=1)] * 4),
        ("$0.008", "0.4 s", "98.80%", "123.5"),
    ),
]


@pytest.mark.parametrize(
    ("build", "expected"), [(b, e) for _, b, e in REFERENCE_TABLE], ids=[n for n, _, _ in REFERENCE_TABLE]
)
def test_reference_table(build, expected):
    assert row(build()) == expected


@pytest.mark.parametrize(
    ("n", "expected"), [(1, "98.50%"), (6, "91.33%"), (12, "83.41%"), (24, "69.58%"), (48, "48.41%")]
)
def test_premium_chain_success_decays_with_length(n, expected):
    assert f"{estimate(sequential([Step(profile=PREMIUM)] * n)).reliability * 100:.2f}%" == expected


def test_routed_plan_levels():
    groups = routed_to_small().groups
    assert [tuple(step.profile for step in group.steps) for group in groups] == [(SMALL, SMALL), (PREMIUM,)] * 4


def test_cache_hits_cost_nothing_and_always_succeed():
    e = estimate(parallel([Step(profile=SMALL, cached=True)] * 3))
    assert e == PlanEstimate(cost_usd=0.0, latency_s=0.01, reliability=1.0, quality_per_usd=math.inf)


def test_empty_plan():
    assert estimate(Plan(())) == PlanEstimate(cost_usd=0.0, latency_s=0.0, reliability=1.0, quality_per_usd=math.inf)


def test_plan_from_dag_groups_by_topological_level():
    a, b, c, d, e = (Step(profile=CallProfile(cost_usd=0.001 * i, latency_s=i, p_success=1.0)) for i in range(1, 6))
    # Given out of order: the diamond a -> (b, c) -> d, then e; a level keeps the given order (c before b).
    plan = plan_from_dag([("e", ["d"], e), ("c", ["a"], c), ("d", ["b", "c"], d), ("a", [], a), ("b", ["a"], b)])
    assert plan == Plan((Group((a,)), Group((c, b)), Group((d,)), Group((e,))))
    # Critical path: 1 + max(3, 2) + 4 + 5.
    assert estimate(plan).latency_s == pytest.approx(13.0)


def test_plan_from_dag_level_is_after_the_deepest_need():
    s = Step(profile=SMALL)
    plan = plan_from_dag([("a", [], s), ("b", ["a"], s), ("c", ["b"], s), ("late", ["a", "c"], s), ("early", ["a"], s)])
    assert [len(group.steps) for group in plan.groups] == [1, 2, 1, 1]
    assert plan.groups[1] == Group((s, s))


@pytest.mark.parametrize(
    ("dag", "message"),
    [
        ([("a", [], Step(profile=SMALL)), ("a", [], Step(profile=SMALL))], "duplicate step id 'a'"),
        ([("a", ["ghost"], Step(profile=SMALL))], "needs unknown steps"),
        ([("a", ["b"], Step(profile=SMALL)), ("b", ["a"], Step(profile=SMALL))], "dependency cycle"),
        ([("a", ["a"], Step(profile=SMALL))], "dependency cycle"),
    ],
)
def test_plan_from_dag_rejects_malformed_dags(dag, message):
    with pytest.raises(ValueError, match=message):
        plan_from_dag(dag)


def test_profiles_and_steps_are_validated():
    with pytest.raises(ValueError, match="probability"):
        CallProfile(cost_usd=0.0, latency_s=0.0, p_success=1.5)
    with pytest.raises(ValueError, match="negative"):
        CallProfile(cost_usd=-0.1, latency_s=0.0, p_success=0.5)
    with pytest.raises(ValueError, match="retries"):
        Step(profile=SMALL, retries=-1)


def test_fits():
    e = estimate(sequential([Step(profile=PREMIUM)] * 12))  # $0.360, 24.0 s
    assert fits(e, budget_usd=0.50, deadline_s=30.0) is None
    assert fits(e, budget_usd=0.36, deadline_s=24.0) is None
    assert fits(e, budget_usd=None, deadline_s=None) is None
    over_budget = fits(e, budget_usd=0.10, deadline_s=30.0)
    assert over_budget is not None and "budget" in over_budget and "deadline" not in over_budget
    over_deadline = fits(e, budget_usd=None, deadline_s=10.0)
    assert over_deadline is not None and "deadline" in over_deadline and "budget" not in over_deadline
    both = fits(e, budget_usd=0.10, deadline_s=10.0)
    assert both is not None and "budget" in both and "deadline" in both


# -- the planner's pre-flight estimate of a real workflow (services/planner/preflight.py) --

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def preflight(data_dir) -> Preflight:
    return Preflight.load(DEPLOY, data_dir, PlannerConfig.load(DEPLOY))


@pytest.fixture(scope="module")
def workflows():
    return load_workflows(DEPLOY / "workflows")


def test_success_probability_is_each_models_recorded_accuracy(preflight, data_dir):
    records = load_recorded_outcomes(data_dir)
    for name, (_latency_s, p_success) in preflight.profiles.items():
        column = preflight.catalog.model(name).recorded_as
        if column is None:  # a real model with no recorded outcomes: reliability unknown
            assert p_success is None, name
            continue
        assert p_success == sum(r.correct[column] for r in records) / len(records)
    assert preflight.profiles["gpt-4-1106-preview"] == (2.0, pytest.approx(0.8548, abs=1e-4))
    assert preflight.profiles["mixtral-8x7b-local"][0] == 0.4


def test_draft_review_is_priced_on_the_models_the_table_picks(preflight, workflows):
    draft, review, final = preflight.steps(workflows["draft-review"], "What is 2+2?", None, None)
    assert (draft.model.name, review.model.name, final.model) == ("mixtral-8x7b-local", "gpt-4-1106-preview", None)
    # The review's prompt holds the draft, not written yet: counted as the draft's max_tokens.
    goal_only = preflight.steps(workflows["answer"], "What is 2+2?", ["gpt-4-1106-preview"], None)[0]
    assert review.input_tokens > 512 + goal_only.input_tokens
    assert review.step.cost_usd == review.model.worst_case_cost(review.input_tokens, 512)
    # One retry per step (limits.step_attempts = 2) lifts each call's success.
    p = preflight.profiles["gpt-4-1106-preview"][1]
    assert review.step.reliability == pytest.approx(1 - (1 - p) ** 2)
    assert final.step.cost_usd == 0.0 and final.step.reliability == 1.0
    total = Preflight.total([draft, review, final])
    assert total.latency_s == pytest.approx(0.4 + 2.0)
    assert total.cost_usd == pytest.approx(draft.step.cost_usd + review.step.cost_usd)


def test_max_tokens_and_pinning_change_the_estimate(preflight, workflows):
    answer = workflows["answer"]
    (small,) = preflight.steps(answer, "q", None, 64)
    assert small.max_tokens == 64 and small.step.cost_usd < preflight.steps(answer, "q", None, None)[0].step.cost_usd
    (pinned,) = preflight.steps(answer, "q", ["gpt-4-1106-preview"], None)
    assert pinned.model.name == "gpt-4-1106-preview" and pinned.step.latency_s == 2.0
    with pytest.raises(PinningError):
        preflight.steps(answer, "q", ["unknown-model"], None)


def test_without_recorded_data_reliability_is_unknown_unless_p_success_is_set(tmp_path, workflows):
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy)
    blind = Preflight.load(deploy, tmp_path / "no-data", PlannerConfig.load(deploy))
    steps = blind.steps(workflows["draft-review"], "q", None, None)
    assert [s.p_known for s in steps] == [False, False, True]
    total = Preflight.total(steps)
    assert math.isnan(total.reliability) and math.isnan(total.quality_per_usd)
    assert total.cost_usd > 0 and total.latency_s == pytest.approx(2.4)
    assert "unknown reliability" in describe(total)

    text = (deploy / "planner.toml").read_text()
    for name in ("mixtral-8x7b-local", "mixtral-8x7b", "gpt-4-1106-preview", "smollm2-135m"):
        text = text.replace(f"[models.{name}]\n", f"[models.{name}]\np_success = 0.9\n")
    (deploy / "planner.toml").write_text(text)
    loaded = Preflight.load(deploy, tmp_path / "no-data", PlannerConfig.load(deploy))
    assert {p for _, p in loaded.profiles.values()} == {0.9}


def test_planner_config_is_checked(tmp_path):
    assert PlannerConfig.load(DEPLOY).limits == Limits(
        attempts_per_day=3, step_attempts=2, identical_calls=2, max_loops=5
    )
    (tmp_path / "planner.toml").write_text("[limits]\nattempts_per_day = 0\n")
    with pytest.raises(ValueError, match="attempts_per_day must be at least 1"):
        PlannerConfig.load(tmp_path)
    (tmp_path / "planner.toml").write_text("[limits]\nattempts = 3\n")
    with pytest.raises(ValueError, match="attempts"):
        PlannerConfig.load(tmp_path)
    with pytest.raises(ValueError, match="no planner configuration"):
        PlannerConfig.load(tmp_path / "elsewhere")


def test_estimate_command_prints_the_figures_and_fails_when_the_plan_cannot_fit():
    runner = CliRunner()
    fits_ = runner.invoke(
        estimate_command, ["draft-review", "--goal", "What is 2+2?", "--budget", "0.05", "--deadline", "5"]
    )
    assert fits_.exit_code == 0, fits_.output
    for text in ("mixtral-8x7b-local", "gpt-4-1106-preview", "2.4 s", "reliability", "q/$", "fits the budget"):
        assert text in fits_.output
    over = runner.invoke(estimate_command, ["draft-review", "--goal", "What is 2+2?", "--budget", "0.001"])
    assert over.exit_code == 1
    assert "does not fit: estimated cost $0.0212 exceeds the budget $0.0010" in over.output
    late = runner.invoke(estimate_command, ["draft-review", "--deadline", "1"])
    assert late.exit_code == 1 and "exceeds the deadline 1.00 s" in late.output
    unknown = runner.invoke(estimate_command, ["nope"])
    assert unknown.exit_code == 2
    assert "unknown workflow 'nope'; known: answer, debate, draft-review, triage" in unknown.output
