"""The router file that `frugalmesh router train` writes and the router loads: plain numpy arrays
and a JSON header in one ``.npz`` (no pickle, so loading a file cannot run code).

It holds, for one weak and one strong model, a prompt model (learned policy) and/or an answer
model (cascade validator), each with the threshold calibrated on its training data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.routing.policies.calibration import OperatingPoint
from services.routing.policies.features import (
    ANSWER_FEATURES,
    EMBEDDING_DIMENSIONS,
    PROMPT_EMBEDDING,
    answer_features,
    prompt_embeddings,
)

# Version 2: the prompt model reads embeddings (version 1 read hashed n-grams).
FORMAT = "frugalmesh-router/2"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class PromptModel:
    """Logistic regression on the prompt's embedding: the chance the weak model answers correctly."""

    coef: np.ndarray  # EMBEDDING_DIMENSIONS
    intercept: float
    calibration: OperatingPoint
    # The share of prompts random routing may keep weak and meet the target on every training fold
    # (training.py); the learned policy routes that share at random instead of by score when its
    # scores did not beat it on held-out folds (``routes_at_random``).
    random_weak_share: float | None = None
    routes_at_random: bool = False

    def scores(self, prompts: list[str]) -> np.ndarray:
        return sigmoid(prompt_embeddings(prompts) @ self.coef + self.intercept)


@dataclass(frozen=True)
class AnswerModel:
    """Logistic regression on the weak answer's structure: the chance that answer is correct."""

    coef: np.ndarray  # len(ANSWER_FEATURES)
    intercept: float
    calibration: OperatingPoint

    def score(self, answer: str) -> float:
        return float(sigmoid(answer_features(answer) @ self.coef + self.intercept))


@dataclass(frozen=True)
class RouterFile:
    weak_model: str
    strong_model: str
    prompt_model: PromptModel | None
    answer_model: AnswerModel | None
    # What it was trained on (files, prompt counts), for whoever reads the file later.
    trained_on: dict[str, int]
    # Paired outcomes per tag (a CSV file's name, a workflow): both right, only strong, only weak,
    # neither (tags.py). The online policy's prior and evidence.
    tag_outcomes: dict[str, list[int]] = field(default_factory=dict)
    # Where the file came from (`router train --from-clickhouse`: which labels, when, held-out figures).
    provenance: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        header: dict = {
            "format": FORMAT,
            "weak_model": self.weak_model,
            "strong_model": self.strong_model,
            "trained_on": self.trained_on,
            "tag_outcomes": self.tag_outcomes,
            "provenance": self.provenance,
        }
        arrays: dict[str, np.ndarray] = {}
        if self.prompt_model is not None:
            prompt = self.prompt_model
            header["prompt_model"] = {
                "embedding": PROMPT_EMBEDDING,
                "intercept": prompt.intercept,
                "calibration": asdict(prompt.calibration),
                "random_weak_share": prompt.random_weak_share,
                "routes_at_random": prompt.routes_at_random,
            }
            arrays["prompt_coef"] = prompt.coef
        if self.answer_model is not None:
            answer = self.answer_model
            header["answer_model"] = {
                "features": list(ANSWER_FEATURES),
                "coef": answer.coef.tolist(),
                "intercept": answer.intercept,
                "calibration": asdict(answer.calibration),
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez_compressed(f, header=np.array(json.dumps(header)), **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> RouterFile:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != FORMAT:
                raise ValueError(
                    f"{path}: router file format {header.get('format')!r}, this version reads {FORMAT}: "
                    "train it again with `frugalmesh router train`"
                )
            prompt_model = None
            if "prompt_model" in header:
                spec = header["prompt_model"]
                coef = data["prompt_coef"]
                if spec["embedding"] != PROMPT_EMBEDDING or coef.shape != (EMBEDDING_DIMENSIONS,):
                    raise ValueError(
                        f"{path}: prompt model reads {spec['embedding']}, not this version's {PROMPT_EMBEDDING}"
                    )
                prompt_model = PromptModel(
                    coef,
                    spec["intercept"],
                    OperatingPoint(**spec["calibration"]),
                    spec.get("random_weak_share"),
                    spec.get("routes_at_random", False),
                )
        answer_model = None
        if "answer_model" in header:
            spec = header["answer_model"]
            if tuple(spec["features"]) != ANSWER_FEATURES:
                raise ValueError(f"{path}: answer features {spec['features']} are not this version's {ANSWER_FEATURES}")
            answer_model = AnswerModel(np.array(spec["coef"]), spec["intercept"], OperatingPoint(**spec["calibration"]))
        return cls(
            header["weak_model"],
            header["strong_model"],
            prompt_model,
            answer_model,
            header["trained_on"],
            header.get("tag_outcomes", {}),
            header.get("provenance", {}),
        )
