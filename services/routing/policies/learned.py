"""The ``learned`` policy: from the prompt alone, the chance the weak model answers correctly;
below the calibrated threshold the step goes to the strong model.

Never worse than random: a router file whose prompt model did not beat random routing on
out-of-fold domains (training.py) says so (``routes_at_random``), and the policy then routes its
``random_weak_share`` of prompts weak at random, calibrated to the target on the training folds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from schemas.messages import StepRequest
from services.routing.policies.routerfile import PromptModel, RouterFile
from services.routing.table import resolve_model
from services.runtime.catalog import Catalog, ModelSpec


def prompt_uniform(prompt: str) -> float:
    """A number in [0, 1) fixed by the prompt: random routing that routes the same prompt alike."""
    return int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") / 2**64


def step_prompt(step: StepRequest) -> str:
    """What the models were trained on: the step's user prompt (all user turns, in order)."""
    return "\n".join(m.content for m in step.messages if m.role == "user")


@dataclass(frozen=True)
class LearnedPolicy:
    weak_model: str
    strong_model: str
    model: PromptModel
    threshold: float
    name: str = "learned"

    @classmethod
    def from_file(cls, router: RouterFile, threshold: float | None = None) -> LearnedPolicy:
        if router.prompt_model is None:
            raise ValueError("the router file has no prompt model (train it with --policy learned)")
        model = router.prompt_model
        calibrated = model.calibration.threshold
        if model.routes_at_random and model.random_weak_share is not None:
            calibrated = 1 - model.random_weak_share
        chosen = calibrated if threshold is None else threshold
        # Loads the embedding model now (about 0.25 s), not on the first step routed.
        model.scores([""])
        return cls(router.weak_model, router.strong_model, model, chosen)

    def scores(self, prompts: list[str]) -> np.ndarray:
        """What the threshold is compared with: the prompt model's chance that the weak model is
        right, or, for a file that fell back to random routing, one minus a uniform number fixed by
        the prompt (so a random ``random_weak_share`` of prompts clears the threshold)."""
        if self.model.routes_at_random:
            return np.array([1 - prompt_uniform(p) for p in prompts])
        return self.model.scores(prompts)

    def score(self, step: StepRequest) -> float:
        return float(self.scores([step_prompt(step)])[0])

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        target = self.weak_model if self.score(step) >= self.threshold else self.strong_model
        return resolve_model(target, step, catalog, downgrade=downgrade)
