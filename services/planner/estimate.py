"""Pre-flight estimate of a plan: its cost, critical-path latency, reliability and quality per dollar.

The planner computes these numbers before it runs a workflow, so that it can refuse or reshape a
plan that cannot fit its budget or deadline (DESIGN.md, "Why it exists"). The model is the one
the design states, and nothing more:

- A plan is a sequence of groups run one after another; the steps of a group run in parallel.
- Each step makes one model call described by a ``CallProfile`` (price, latency, success
  probability). A cached step makes no call: it costs $0, takes ``CACHE_HIT_LATENCY_S`` and
  always succeeds.
- Cost is the sum of the steps' first-attempt prices. Retries are *not* counted: a retry is paid
  only when the first attempt fails, and the estimate is the price of the plan as written (the
  reference table keeps "each step retried once" at the same $0.360 as the plan without retries).
- Latency is the critical path: the sum over groups of the slowest step in each group. Retries do
  not lengthen it, for the same reason as above.
- Reliability is the product of the steps' successes, where ``k`` retries lift a step's success
  ``p`` to ``1 - (1 - p) ** (k + 1)``.
- Quality per dollar is reliability / cost (infinite for a plan that costs nothing).

Routing and caching are properties of each step, not of the plan: "routed to small" means a step's
profile is the small model's, and "cached" means the step is a cache hit (its profile and retries
then no longer matter). The reference table (tests/test_estimate.py) fixes how they combine: a
router sends only the simple steps to the small model, so the 12-step chain "routed to small" is 4
stages of two independent small reductions side by side feeding one premium synthesis ($0.136,
9.6 s, 59.87%); and in the plan that is "cached, retried", the cache hits are the premium steps
and each small step is retried once ($0.008, 0.4 s, 98.80%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

# A cache hit makes no model call; what is left is the lookup: small, but not zero.
CACHE_HIT_LATENCY_S = 0.01


class CallProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What one call to one model costs, how long it takes and how often it succeeds."""

    cost_usd: float
    latency_s: float
    p_success: float

    def __post_init__(self) -> None:
        # msgspec checks constraints on decode only; profiles are also built in code.
        if self.cost_usd < 0 or self.latency_s < 0:
            raise ValueError(f"cost and latency must not be negative: {self}")
        if not 0.0 <= self.p_success <= 1.0:
            raise ValueError(f"p_success must be a probability: {self}")


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a plan: one call of ``profile``, retried up to ``retries`` times, or a cache hit."""

    profile: CallProfile
    retries: int = 0
    cached: bool = False

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must not be negative: {self}")

    @property
    def cost_usd(self) -> float:
        """The price of its first attempt (nothing for a cache hit)."""
        return 0.0 if self.cached else self.profile.cost_usd

    @property
    def latency_s(self) -> float:
        """How long its first attempt takes (the lookup, for a cache hit)."""
        return CACHE_HIT_LATENCY_S if self.cached else self.profile.latency_s

    @property
    def reliability(self) -> float:
        """The probability that one of its attempts succeeds."""
        if self.cached:
            return 1.0
        return 1.0 - (1.0 - self.profile.p_success) ** (self.retries + 1)


class Group(msgspec.Struct, frozen=True):
    """Steps that run in parallel; the group ends when its slowest step does."""

    steps: tuple[Step, ...]


class Plan(msgspec.Struct, frozen=True):
    """Groups that run one after another."""

    groups: tuple[Group, ...]


class PlanEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """The pre-flight figures of a plan."""

    cost_usd: float
    latency_s: float
    reliability: float
    quality_per_usd: float


def estimate(plan: Plan) -> PlanEstimate:
    """Cost (first attempts only), critical-path latency, reliability and reliability per dollar of ``plan``."""
    steps = [step for group in plan.groups for step in group.steps]
    cost = math.fsum(step.cost_usd for step in steps)
    latency = math.fsum(max((step.latency_s for step in group.steps), default=0.0) for group in plan.groups)
    reliability = math.prod(step.reliability for step in steps)
    return PlanEstimate(
        cost_usd=cost,
        latency_s=latency,
        reliability=reliability,
        quality_per_usd=reliability / cost if cost > 0 else math.inf,
    )


def plan_from_dag(steps: Sequence[tuple[str, Sequence[str], Step]]) -> Plan:
    """The plan of a workflow DAG given as ``(step_id, needs, step)``: one group per topological level.

    A step's level is one more than the deepest step it needs, so every step runs as early as its
    inputs allow and the groups' slowest members form the critical path. Within a group, steps keep
    the order they were given in. Raises ``ValueError`` on a duplicate id, an unknown need or a cycle.
    """
    needs_of: dict[str, Sequence[str]] = {}
    for step_id, needs, _ in steps:
        if step_id in needs_of:
            raise ValueError(f"duplicate step id {step_id!r}")
        needs_of[step_id] = needs
    for step_id, needs in needs_of.items():
        unknown = [need for need in needs if need not in needs_of]
        if unknown:
            raise ValueError(f"step {step_id!r} needs unknown steps {unknown}")

    # Kahn's algorithm (iterative, so a long chain cannot hit the recursion limit): a step is
    # placed once every step it needs has been, one level after the deepest of them.
    waiting = {step_id: set(needs) for step_id, needs in needs_of.items()}
    needed_by: dict[str, list[str]] = {step_id: [] for step_id in needs_of}
    for step_id, unmet in waiting.items():
        for need in unmet:
            needed_by[need].append(step_id)
    levels: dict[str, int] = {}
    ready = [step_id for step_id, needs in waiting.items() if not needs]
    while ready:
        step_id = ready.pop()
        levels[step_id] = 1 + max((levels[need] for need in needs_of[step_id]), default=-1)
        for dependent in needed_by[step_id]:
            waiting[dependent].discard(step_id)
            if not waiting[dependent]:
                ready.append(dependent)
    if len(levels) < len(needs_of):
        raise ValueError(f"dependency cycle among steps {sorted(set(needs_of) - set(levels))}")
    grouped: list[list[Step]] = [[] for _ in range(max(levels.values(), default=-1) + 1)]
    for step_id, _, step in steps:
        grouped[levels[step_id]].append(step)
    return Plan(tuple(Group(tuple(group)) for group in grouped))


def fits(estimate: PlanEstimate, budget_usd: float | None, deadline_s: float | None) -> str | None:
    """Why a plan with this estimate cannot fit the budget and deadline, or None when it fits.

    ``None`` for a budget or a deadline means there is none. Both reasons are given when both fail,
    so that the planner knows whether to cut cost, latency or both when it reshapes the plan.
    """
    reasons = []
    if budget_usd is not None and estimate.cost_usd > budget_usd:
        reasons.append(f"estimated cost ${estimate.cost_usd:.4f} exceeds the budget ${budget_usd:.4f}")
    if deadline_s is not None and estimate.latency_s > deadline_s:
        reasons.append(f"estimated latency {estimate.latency_s:.2f} s exceeds the deadline {deadline_s:.2f} s")
    return "; ".join(reasons) or None
