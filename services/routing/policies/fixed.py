"""The ``fixed`` policy: every step runs on one pinned model."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.messages import StepRequest
from services.routing.table import resolve_model
from services.runtime.catalog import Catalog, ModelSpec


@dataclass(frozen=True)
class FixedPolicy:
    model: str

    @property
    def name(self) -> str:
        return f"fixed:{self.model}"

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        return resolve_model(self.model, step, catalog, downgrade=downgrade)
