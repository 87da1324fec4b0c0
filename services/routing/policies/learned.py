"""The ``learned`` policy: from the prompt alone, the chance the weak model answers correctly;
below the calibrated threshold the step goes to the strong model."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.messages import StepRequest
from services.routing.policies.routerfile import PromptModel, RouterFile
from services.routing.table import resolve_model
from services.runtime.catalog import Catalog, ModelSpec


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
        chosen = model.calibration.threshold if threshold is None else threshold
        # Loads the embedding model now (about 0.25 s), not on the first step routed.
        model.scores([""])
        return cls(router.weak_model, router.strong_model, model, chosen)

    def score(self, step: StepRequest) -> float:
        return float(self.model.scores([step_prompt(step)])[0])

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        target = self.weak_model if self.score(step) >= self.threshold else self.strong_model
        return resolve_model(target, step, catalog, downgrade=downgrade)
