"""The model catalogue and price table (deploy/models.toml): what each model costs and where it runs."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.messages import Tier, Usage
from schemas.subjects import Subjects, token

TIER_LADDER: tuple[Tier, ...] = ("local", "mid", "frontier")
MILLION = 1_000_000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tier: Tier
    service: Literal["local", "cloud"]
    provider: str
    tokenizer: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cached_input_usd_per_mtok: float | None = None
    recorded_as: str | None = None
    # The latency model of the replay and synthetic backends (services/runtime/inference/latency.py):
    # time to first token, and output tokens per second after it (None: no decode time).
    ttft_ms: float = 0.0
    output_tokens_per_s: float | None = None

    def cost(self, usage: Usage) -> float:
        cached_price = self.cached_input_usd_per_mtok
        if cached_price is None:
            cached_price = self.input_usd_per_mtok
        fresh = usage.input_tokens - usage.cached_input_tokens
        return (
            fresh * self.input_usd_per_mtok
            + usage.cached_input_tokens * cached_price
            + usage.output_tokens * self.output_usd_per_mtok
        ) / MILLION

    def worst_case_cost(self, input_tokens: int, max_tokens: int) -> float:
        """What a call can cost at most: its known input plus max_tokens of output."""
        return (input_tokens * self.input_usd_per_mtok + max_tokens * self.output_usd_per_mtok) / MILLION

    def subject(self, subjects: Subjects) -> str:
        if self.service == "local":
            return subjects.infer_local(self.name)
        return subjects.infer_cloud(self.provider)


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    backend: str
    base_url: str = ""
    api_key_env: str = ""


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]
    providers: dict[str, ProviderSpec]

    @classmethod
    def load(cls, deploy_dir: Path) -> Catalog:
        path = deploy_dir / "models.toml"
        raw = tomllib.loads(path.read_text())
        models = {}
        for name, spec in raw.get("models", {}).items():
            token(name)
            if spec["tier"] not in TIER_LADDER:
                raise ValueError(f"{path}: model {name}: tier must be one of {TIER_LADDER}")
            models[name] = ModelSpec(name=name, **spec)
        providers = {name: ProviderSpec(name=name, **spec) for name, spec in raw.get("providers", {}).items()}
        for model in models.values():
            if model.provider not in providers:
                raise ValueError(f"{path}: model {model.name} names provider {model.provider!r}, which is not defined")
        return cls(models=models, providers=providers)

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}") from None

    def in_tier(self, tier: Tier) -> list[ModelSpec]:
        return [m for m in self.models.values() if m.tier == tier]
