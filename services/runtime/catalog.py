"""The model catalogue and price table (deploy/models.toml): what each model costs and where it runs.

A model's price is either a list price (``input_usd_per_mtok``, ``output_usd_per_mtok``) or, for a
model the mesh runs itself, ``hardware = "<profile>"``: prices computed from that profile of
deploy/hardware.toml, beside models.toml (services/runtime/hardware.py).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from schemas.messages import Tier, Usage
from schemas.subjects import Subjects, token
from services.runtime.hardware import HardwareProfile, load_profiles
from services.runtime.settings import MeshSettings
from services.runtime.tokens import tokenizer

TIER_LADDER: tuple[Tier, ...] = ("local", "mid", "frontier")
MILLION = 1_000_000
LIST_PRICES = ("input_usd_per_mtok", "output_usd_per_mtok")
PRICE_KEYS = (*LIST_PRICES, "cached_input_usd_per_mtok")


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
    # The latency model of the replay and synthetic backends (services/inference/latency.py):
    # time to first token (the fixed part), uncached prompt tokens prefilled per second before it
    # (None: no prefill time), and output tokens per second after it (None: no decode time).
    ttft_ms: float = 0.0
    prefill_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    # The synthetic backend's prefix cache (services/inference/prefix_cache.py): blocks of
    # this many tokens (vLLM's default is 16); 0: the provider caches nothing.
    prompt_cache_block_tokens: int = 0
    # The hardware profile the prices were computed from; "" for list prices.
    hardware: str = ""

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
    # The local engine `frugalmesh up` runs (or FRUGALMESH_LOCAL_ENGINE_URL names): its URL
    # replaces base_url, and local-inference reads its load from the engine's /metrics.
    local_engine: bool = False

    def url(self, settings: MeshSettings) -> str:
        if self.local_engine and settings.local_engine_url:
            return settings.local_engine_url
        return self.base_url


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]
    providers: dict[str, ProviderSpec]

    @classmethod
    def load(cls, deploy_dir: Path) -> Catalog:
        path = deploy_dir / "models.toml"
        raw = tomllib.loads(path.read_text())
        hardware_path = deploy_dir / "hardware.toml"
        # A catalogue of list prices needs no hardware.toml (e.g. deploy/loadtest/).
        profiles = load_profiles(hardware_path) if hardware_path.exists() else {}
        models = {}
        for name, spec in raw.get("models", {}).items():
            token(name)
            if spec["tier"] not in TIER_LADDER:
                raise ValueError(f"{path}: model {name}: tier must be one of {TIER_LADDER}")
            if "hardware" in spec:
                spec = _priced_by_hardware(path, name, spec, hardware_path, profiles)
            elif not all(key in spec for key in LIST_PRICES):
                raise ValueError(f"{path}: model {name}: set input_usd_per_mtok and output_usd_per_mtok, or hardware")
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

    def load_tokenizers(self, service: Literal["local", "cloud"] | None = None) -> None:
        """Load the tokenizers of every model (of ``service``'s models only, when given) now. A
        service calls this as it is built: loaded on first use instead (cl100k takes about 0.2 s),
        the first call stalled, and the calls queued behind it with it (the first 0.4 s of a
        50 calls/s run took 100-330 ms each)."""
        models = [m for m in self.models.values() if service is None or m.service == service]
        for name in sorted({m.tokenizer for m in models}):
            tokenizer(name)


def _priced_by_hardware(
    path: Path, name: str, spec: dict[str, Any], hardware_path: Path, profiles: dict[str, HardwareProfile]
) -> dict[str, Any]:
    """``spec`` with the prices of the hardware profile it names."""
    prices = [key for key in PRICE_KEYS if key in spec]
    if prices:
        raise ValueError(f"{path}: model {name}: set hardware or prices, not both ({prices[0]!r})")
    if spec.get("service") != "local":
        # A provider bills its list price whatever its hardware costs it.
        raise ValueError(f"{path}: model {name}: hardware prices only models of service = \"local\"")
    if spec["hardware"] not in profiles:
        known = f"known: {', '.join(sorted(profiles))}" if hardware_path.exists() else "the file does not exist"
        raise ValueError(
            f"{path}: model {name} names hardware {spec['hardware']!r}, which {hardware_path} does not define ({known})"
        )
    profile = profiles[spec["hardware"]]
    return spec | {"input_usd_per_mtok": profile.input_usd_per_mtok, "output_usd_per_mtok": profile.output_usd_per_mtok}
