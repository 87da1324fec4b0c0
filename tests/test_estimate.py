"""The pre-flight estimate reproduces the reference table of the design, figure for figure.

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

import pytest

from services.planner.estimate import (
    CallProfile,
    Estimate,
    Group,
    Plan,
    Step,
    estimate,
    fits,
    plan_from_dag,
)

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
    assert e == Estimate(cost_usd=0.0, latency_s=0.01, reliability=1.0, quality_per_usd=math.inf)


def test_empty_plan():
    assert estimate(Plan(())) == Estimate(cost_usd=0.0, latency_s=0.0, reliability=1.0, quality_per_usd=math.inf)


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
