"""From the model a policy names to the model a step may run on."""

from __future__ import annotations

from schemas.messages import StepRequest
from services.router.table import pick_model, tier_below
from services.runtime.catalog import Catalog, ModelSpec


def resolve(name: str, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
    """``name`` itself when the step allows it; otherwise, as the rules do, the cheapest allowed
    model of its tier (one tier down under pacing's downgrade), never one outside the allow-list."""
    model = catalog.model(name)
    if not downgrade and (step.allow_models is None or name in step.allow_models):
        return model
    return pick_model(tier_below(model.tier) if downgrade else model.tier, step.allow_models, catalog)
