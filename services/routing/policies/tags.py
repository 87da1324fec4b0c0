"""Per-tag evidence of the weak model's quality, and the share of each tag's calls it may take.

A tag is what a call says about what it is (in live traffic its workflow; in a replay of
recorded data the CSV file's name). For each tag the evidence is paired labels: calls both
models answered (a shadow call, or recorded outcomes), counted by outcome: both right, only the
strong model right, only the weak one, neither. What routing a tag's call to the weak model costs
in accuracy is the tag's *gap*, P(only strong right) - P(only weak right).

The posterior of a tag's four outcome shares is a Dirichlet whose prior is the training data's
pooled shares times a strength ``m`` fitted by moments to how much the training tags' gaps spread
(empirical Bayes: a tag with no labels is the average tag, and labels move it as fast as tags
really differ). Formula of the gap's posterior, shares p and total count a0 = m + n:
mean p_s - p_w, variance (p_s(1 - p_s) + p_w(1 - p_w) + 2 p_s p_w) / (a0 + 1).

The plan: keep a tag weak in order of its cautious gap (mean + ``caution`` standard deviations),
weighted by its share of traffic, until the accuracy the weak calls lose would exceed
(1 - target) times the strong model's expected accuracy over the traffic; the tag at the margin
gets a fraction. Tags where the weak model is no worse cost nothing and are always weak. With no
labels at all every tag is the prior, and the plan is one weak share for all: random routing
calibrated to the target on the training data, the fallback for weak evidence. The prior itself
moves with the pooled labels of the live tags (``TagPrior.moved_by``): a traffic whose domains
all suit the weak model better than the training mix is recognised as such before each of its
tags has many labels of its own.

Deliberately not done: modelling a tag's drift over time (labels never expire), and one-sided
feedback (a score for one model's answer) in the gap; they are stored, not used here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Outcome order of a tag's counts.
BOTH, STRONG_ONLY, WEAK_ONLY, NEITHER = range(4)
# Strength bounds of the fitted prior: at least a few calls' worth, at most what lets ~50 labels move it.
MIN_STRENGTH, MAX_STRENGTH = 2.0, 50.0


def outcome_index(weak_correct: bool, strong_correct: bool) -> int:
    if weak_correct:
        return BOTH if strong_correct else WEAK_ONLY
    return STRONG_ONLY if strong_correct else NEITHER


def count_outcomes(pairs: list[tuple[bool, bool]]) -> np.ndarray:
    counts = np.zeros(4)
    for weak_correct, strong_correct in pairs:
        counts[outcome_index(weak_correct, strong_correct)] += 1
    return counts


@dataclass(frozen=True)
class TagPrior:
    """The average tag's outcome shares and how many labels' worth they weigh."""

    shares: np.ndarray  # 4 outcome shares, summing to 1
    strength: float

    @classmethod
    def fit(cls, by_tag: Mapping[str, np.ndarray]) -> TagPrior:
        """Pooled shares of the training tags; strength from the spread of their gaps beyond what
        their sizes explain (method of moments)."""
        total = sum(by_tag.values(), np.zeros(4))
        if total.sum() == 0:
            raise ValueError("a tag prior needs labelled outcomes")
        shares = total / total.sum()
        unit_variance = _gap_variance(shares, 0.0)  # the gap's variance of one label, times (a0 + 1)
        sized = [c for c in by_tag.values() if c.sum() > 0]
        gaps = np.array([(c[STRONG_ONLY] - c[WEAK_ONLY]) / c.sum() for c in sized])
        sampling = np.mean([unit_variance / c.sum() for c in sized])
        between = float(np.var(gaps)) - sampling if len(sized) > 1 else 0.0
        strength = unit_variance / between - 1 if between > 0 else MAX_STRENGTH
        return cls(shares, float(np.clip(strength, MIN_STRENGTH, MAX_STRENGTH)))

    def moved_by(self, pooled: np.ndarray) -> TagPrior:
        """The prior of one traffic's tags: its tags' pooled labels move the training average as
        they would move one tag's (the traffic is one more draw from the tags' population), and the
        spread between tags stays the training tags'. New domains that suit the weak model better
        or worse than the training mix shift every tag's prior with them."""
        alpha = self.shares * self.strength + pooled
        return TagPrior(alpha / alpha.sum(), self.strength)


def _gap_variance(shares: np.ndarray, total: float) -> float:
    s, w = shares[STRONG_ONLY], shares[WEAK_ONLY]
    return float((s * (1 - s) + w * (1 - w) + 2 * s * w) / (total + 1))


@dataclass(frozen=True)
class TagPosterior:
    gap: float
    gap_sd: float
    strong_accuracy: float
    labels: int

    @classmethod
    def of(cls, counts: np.ndarray, prior: TagPrior) -> TagPosterior:
        alpha = prior.shares * prior.strength + counts
        total = float(alpha.sum())
        shares = alpha / total
        return cls(
            gap=float(shares[STRONG_ONLY] - shares[WEAK_ONLY]),
            gap_sd=_gap_variance(shares, total) ** 0.5,
            strong_accuracy=float(shares[BOTH] + shares[STRONG_ONLY]),
            labels=int(counts.sum()),
        )


def plan_weak_shares(
    posteriors: Mapping[str, TagPosterior], traffic: Mapping[str, float], target: float, caution: float
) -> dict[str, float]:
    """Each tag's share of calls to route weak so that, over ``traffic`` (calls per tag), the
    expected accuracy stays at ``target`` times the strong model's with each tag's gap taken
    ``caution`` standard deviations pessimistically.

    Tried on the tuning domains and not kept: pricing the caution on the total loss instead (its
    standard deviation over all tags, whose errors partly cancel) kept no more calls weak at the
    caution that met the target as reliably (docs/routing.md).
    """
    total = sum(traffic.values())
    if total <= 0:
        return {}
    weight = {tag: traffic[tag] / total for tag in traffic}
    budget = (1 - target) * sum(weight[t] * posteriors[t].strong_accuracy for t in traffic)
    cautious = {t: posteriors[t].gap + caution * posteriors[t].gap_sd for t in traffic}
    # Tags of equal cautious gap (those with no labels of their own, above all) share alike: the
    # fallback is random routing over all of them, not some of them weak and others not.
    groups: dict[float, list[str]] = {}
    for tag in traffic:
        groups.setdefault(round(cautious[tag], 12), []).append(tag)
    shares: dict[str, float] = {}
    for gap in sorted(groups):
        loss = sum(weight[t] for t in groups[gap]) * gap
        if loss <= 0:
            # The weak model is no worse here (cautiously): weak always, and its gain adds to the budget.
            share = 1.0
        elif budget > 0:
            share = min(1.0, budget / loss)
        else:
            share = 0.0
        budget -= share * loss
        shares |= dict.fromkeys(groups[gap], share)
    return shares
