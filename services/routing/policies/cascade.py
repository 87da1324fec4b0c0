"""The ``cascade`` policy: the weak model answers first; its answer is kept when the validator
trusts it, else the step is asked again of the strong model. Both calls are metered.

The validator scores the weak answer's structure and self-consistency (a stated final answer,
calculations that hold when recomputed, no hedging; features.answer_features) with a logistic
model trained on recorded weak answers and their grades. It needs answer text: on outcomes
recorded without it (MMLU records correctness only) it has nothing to go on, scores every answer
alike, and the cascade then escalates as its calibration on answer-bearing data dictates.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.messages import InferenceResult, StepRequest
from services.routing.policies.routerfile import AnswerModel, RouterFile
from services.routing.table import resolve_model
from services.runtime.catalog import Catalog, ModelSpec


@dataclass(frozen=True)
class CascadePolicy:
    weak_model: str
    strong_model: str
    validator: AnswerModel
    threshold: float
    name: str = "cascade"

    @classmethod
    def from_file(cls, router: RouterFile, threshold: float | None = None) -> CascadePolicy:
        if router.answer_model is None:
            raise ValueError(
                "the router file has no answer model (train it with --policy cascade on data with responses)"
            )
        model = router.answer_model
        chosen = model.calibration.threshold if threshold is None else threshold
        return cls(router.weak_model, router.strong_model, model, chosen)

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        return resolve_model(self.weak_model, step, catalog, downgrade=downgrade)

    def accepts(self, result: InferenceResult) -> bool:
        return self.validator.score(result.output) >= self.threshold

    def escalation(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        return resolve_model(self.strong_model, step, catalog, downgrade=downgrade)
