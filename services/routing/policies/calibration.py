"""Thresholds calibrated to a target quality: the cheapest operating point that keeps accuracy at
``target`` times the strong model's.

Both learned policies reduce to one rule: a prompt stays on the weak model when its score is at
least the threshold (learned: the predicted chance the weak model is right; cascade: the
validator's confidence in the weak answer), else it goes to the strong one. The accuracy of every
threshold follows from the recorded outcomes, so calibration is a sweep over the sorted scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    weak_share: float
    accuracy: float
    strong_accuracy: float
    target: float

    @property
    def meets_target(self) -> bool:
        return self.accuracy >= self.target * self.strong_accuracy


def sweep(scores: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray) -> tuple[np.ndarray, ...]:
    """(thresholds, weak_share, accuracy) for each cut: the k highest scores stay weak, k = 0..n.

    The threshold of cut k is its k-th highest score (+inf for k = 0); ties are kept together,
    since a threshold cannot split prompts of equal score.
    """
    order = np.argsort(-scores, kind="stable")
    ranked, weak, strong = scores[order], weak_correct[order].astype(float), strong_correct[order].astype(float)
    n = len(scores)
    correct = np.concatenate([[0.0], np.cumsum(weak)]) + np.concatenate([np.cumsum(strong[::-1])[::-1], [0.0]])
    thresholds = np.concatenate([[np.inf], ranked])
    # A cut inside a run of equal scores is not reachable: keep only the last cut of each run.
    reachable = np.concatenate([[True], ranked[1:] != ranked[:-1], [True]])
    keep = np.nonzero(reachable)[0]
    return thresholds[keep], keep / n, correct[keep] / n


def calibrate(
    scores: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray, target: float
) -> OperatingPoint:
    """The lowest threshold (most prompts kept weak) whose accuracy is at least ``target`` times the
    strong model's on these outcomes. Scores should be out-of-sample (cross-validated) so the
    threshold is not fitted to the noise of the model that made them."""
    if not 0 < target <= 1.5:
        raise ValueError(f"target must be a share of the strong model's accuracy, e.g. 0.95, not {target}")
    thresholds, _, accuracy = sweep(scores, weak_correct, strong_correct)
    ok = np.nonzero(accuracy >= target * float(np.mean(strong_correct)))[0]
    # Cut 0 (everything strong) always qualifies when target <= 1; above 1 nothing may.
    best = int(ok.max()) if len(ok) else int(np.argmax(accuracy))
    return operating_point(float(thresholds[best]), scores, weak_correct, strong_correct, target)


def calibrate_every_fold(
    scores: np.ndarray,
    weak_correct: np.ndarray,
    strong_correct: np.ndarray,
    folds: list[np.ndarray],
    target: float,
) -> OperatingPoint:
    """The lowest threshold that meets ``target`` on each held-out fold on its own: the highest of
    the folds' calibrated thresholds, described on all the scores together.

    One threshold over the pooled folds is set by the average fold; a fold of unseen domains that
    suits the weak model less then falls short, and so do new domains later (docs/routing.md,
    "Calibration"). Asking it of every fold prices in that spread.
    """
    threshold = max(calibrate(scores[f], weak_correct[f], strong_correct[f], target).threshold for f in folds)
    return operating_point(threshold, scores, weak_correct, strong_correct, target)


def random_weak_share(
    weak_correct: np.ndarray, strong_correct: np.ndarray, folds: list[np.ndarray], target: float
) -> float:
    """The largest share of prompts that random routing may send weak while meeting ``target`` on
    each fold on its own (as ``calibrate_every_fold`` asks of a threshold): accuracy
    q w + (1 - q) s >= target s, so q <= (1 - target) s / (s - w) where the weak model is worse."""
    shares = []
    for fold in folds:
        weak, strong = float(np.mean(weak_correct[fold])), float(np.mean(strong_correct[fold]))
        shares.append(1.0 if strong <= weak else min(1.0, (1 - target) * strong / (strong - weak)))
    return min(shares)


def operating_point(
    threshold: float, scores: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray, target: float
) -> OperatingPoint:
    weak = scores >= threshold
    return OperatingPoint(
        threshold=threshold,
        weak_share=float(np.mean(weak)),
        accuracy=float(np.mean(np.where(weak, weak_correct, strong_correct))),
        strong_accuracy=float(np.mean(strong_correct)),
        target=target,
    )
