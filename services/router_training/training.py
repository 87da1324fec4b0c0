"""Training the learned policies from recorded outcomes (`frugalmesh router train`).

Each model's threshold is calibrated on out-of-fold scores of the training data (k-fold cross
validation): every prompt is scored by a model that did not see it, so the threshold is not set
on the optimism of a model scoring its own training set; the prompt model's must also meet the
target on every held-out fold. The final model is then fit on all of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from services.routing.policies.calibration import calibrate, calibrate_every_fold, random_weak_share
from services.routing.policies.features import answer_features, prompt_embeddings
from services.routing.policies.routerfile import AnswerModel, PromptModel, RouterFile, sigmoid
from services.routing.policies.tags import count_outcomes
from services.runtime.data import RESPONSE_SUFFIX, Record

PolicyName = Literal["learned", "cascade"]
# L2 strength of the prompt model, chosen on the training data alone: of 0.03, 0.1, 0.3, 1 and 3,
# 0.1 kept the most prompts weak at 95% of GPT-4's accuracy on out-of-fold scores of unseen
# MMLU training domains; stronger fits learn domain traits that do not transfer.
PROMPT_C = 0.1
FOLDS = 5


def _fit(features: np.ndarray, labels: np.ndarray, strength: float = 1.0) -> tuple[np.ndarray, float]:
    regression = LogisticRegression(C=strength, max_iter=2000).fit(features, labels)
    return regression.coef_[0], float(regression.intercept_[0])


def calibration_groups(records: Sequence[Record]) -> np.ndarray:
    """Which prompts are held out together when scoring out of fold. Files that share a folder
    with other files (MMLU's domains) are held out whole, so the threshold is set on how the model
    scores domains it never saw, which is how it meets new ones; a file alone in its folder
    (GSM8K) is held out by rows. The same rule as `frugalmesh router split --by files`."""
    per_folder = Counter(str(Path(dataset).parent) for dataset in {r.dataset for r in records})
    keys = [
        r.dataset if per_folder[str(Path(r.dataset).parent)] > 1 else f"{r.dataset}#{index % FOLDS}"
        for index, r in enumerate(records)
    ]
    return np.unique(keys, return_inverse=True)[1]


def _out_of_fold(
    labels: np.ndarray, groups: np.ndarray, seed: int, fit_and_score: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every prompt's score from a model fit without its fold, and the folds (index arrays)."""
    n_folds = min(FOLDS, len(np.unique(groups)))
    if n_folds < 2 or labels.all() or not labels.any():
        raise ValueError("training needs prompts in two groups or more, some the weak model got right and some wrong")
    scores = np.empty(len(labels))
    folds = []
    for train, held in StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(
        np.zeros(len(labels)), labels, groups
    ):
        scores[held] = fit_and_score(train, held)
        folds.append(held)
    return scores, folds


def train_prompt_model(records: Sequence[Record], weak: str, strong: str, target: float, seed: int = 0) -> PromptModel:
    embeddings = prompt_embeddings([r.prompt for r in records])
    weak_correct = np.array([r.correct[weak] for r in records])
    strong_correct = np.array([r.correct[strong] for r in records])

    def fit_and_score(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        coef, intercept = _fit(embeddings[train], weak_correct[train], PROMPT_C)
        return sigmoid(embeddings[held] @ coef + intercept)

    oof, folds = _out_of_fold(weak_correct, calibration_groups(records), seed, fit_and_score)
    coef, intercept = _fit(embeddings, weak_correct, PROMPT_C)
    point = calibrate_every_fold(oof, weak_correct, strong_correct, folds, target)
    # Never worse than random: when the scores, judged on folds they never saw, keep no more
    # prompts weak at the target than random routing calibrated the same way, route at random.
    random_share = random_weak_share(weak_correct, strong_correct, folds, target)
    return PromptModel(coef, intercept, point, random_share, routes_at_random=random_share >= point.weak_share)


def train_answer_model(records: Sequence[Record], weak: str, strong: str, target: float, seed: int = 0) -> AnswerModel:
    answered = [r for r in records if r.responses.get(weak)]
    if not answered:
        raise ValueError(
            f"the cascade's validator learns from the weak model's answers: no {weak}_response column has text"
        )
    features = np.array([answer_features(r.responses[weak]) for r in answered])
    weak_correct = np.array([r.correct[weak] for r in answered])
    strong_correct = np.array([r.correct[strong] for r in answered])

    def fit_and_score(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        coef, intercept = _fit(features[train], weak_correct[train])
        return sigmoid(features[held] @ coef + intercept)

    # One threshold over all folds: the validator reads an answer's structure, not its domain, so
    # a fold's share of easy answers is noise to average, not a shift to price in (on GSM8K's
    # row folds of ~260 answers the strictest fold kept only 5% of answers weak).
    oof, _ = _out_of_fold(weak_correct, calibration_groups(answered), seed, fit_and_score)
    coef, intercept = _fit(features, weak_correct)
    return AnswerModel(coef, intercept, calibrate(oof, weak_correct, strong_correct, target))


def trainable_policies(records: Sequence[Record], weak_column: str) -> tuple[list[PolicyName], str | None]:
    """What the data supports: the learned policy always; the cascade only where the weak model's
    answers were recorded (its validator learns from them). The second item says why the cascade
    was left out, or is None."""
    if any(r.responses.get(weak_column) for r in records):
        return ["learned", "cascade"], None
    return ["learned"], (
        f"cascade skipped: no {weak_column}{RESPONSE_SUFFIX} column has text in the data, and the cascade's "
        "validator learns from the weak model's answers (MMLU records correctness only)"
    )


def train(
    records: Sequence[Record],
    *,
    weak_model: str,
    strong_model: str,
    weak_column: str,
    strong_column: str,
    policies: Sequence[PolicyName],
    target: float,
    seed: int = 0,
) -> RouterFile:
    """A router file for ``weak_model``/``strong_model`` (catalogue names) from the outcomes recorded
    in columns ``weak_column``/``strong_column``."""
    usable = [r for r in records if weak_column in r.correct and strong_column in r.correct]
    if not usable:
        raise ValueError(f"no record has both columns {weak_column!r} and {strong_column!r}")
    return RouterFile(
        weak_model=weak_model,
        strong_model=strong_model,
        prompt_model=train_prompt_model(usable, weak_column, strong_column, target, seed)
        if "learned" in policies
        else None,
        answer_model=train_answer_model(usable, weak_column, strong_column, target, seed)
        if "cascade" in policies
        else None,
        trained_on=dict(sorted(Counter(r.dataset for r in usable).items())),
        tag_outcomes=tag_outcomes(usable, weak_column, strong_column),
    )


def record_tag(record: Record) -> str:
    """A recorded prompt's tag: its CSV file's name, as a workflow would name live calls."""
    return Path(record.dataset).name


def tag_outcomes(records: Sequence[Record], weak_column: str, strong_column: str) -> dict[str, list[int]]:
    """Each tag's paired outcomes (tags.py order: both right, only strong, only weak, neither)."""
    pairs: dict[str, list[tuple[bool, bool]]] = {}
    for r in records:
        pairs.setdefault(record_tag(r), []).append((r.correct[weak_column], r.correct[strong_column]))
    return {tag: [int(c) for c in count_outcomes(p)] for tag, p in sorted(pairs.items())}
