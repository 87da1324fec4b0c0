"""The routing table (deploy/routing.toml) and the routing decision, as pure functions of a step.

Nothing here touches NATS, so routing policies and the decision-latency benchmark can call
``RoutingTable.choose(step, catalog)`` directly.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from schemas.messages import StepRequest, Tier
from services.runtime.catalog import TIER_LADDER, Catalog, ModelSpec

ROUTING_FILE = "routing.toml"


class PinningError(Exception):
    """No model of any tier is allowed by the step's allow-list: the step must not run."""

    def __init__(self, tier: Tier, allow_models: Sequence[str]) -> None:
        super().__init__(f"no known model is allowed (allow_models={list(allow_models)}); the table chose tier {tier}")
        self.tier = tier


@dataclass(frozen=True)
class Rule:
    """One row of the table. Every field left out matches anything; the first matching rule wins."""

    tier: Tier
    name: str = ""
    workflow: str | None = None
    role: str | None = None
    min_prompt_chars: int | None = None
    max_prompt_chars: int | None = None

    def matches(self, step: StepRequest, prompt_chars: int) -> bool:
        return (
            (self.workflow is None or step.workflow == self.workflow)
            and (self.role is None or step.role == self.role)
            and (self.min_prompt_chars is None or prompt_chars >= self.min_prompt_chars)
            and (self.max_prompt_chars is None or prompt_chars <= self.max_prompt_chars)
        )


_RULE_KEYS = frozenset(f.name for f in fields(Rule))
# [policies] is read by services.routing.policies.PolicySet, [cache] by services.router.cache.CacheConfig.
_TABLE_KEYS = frozenset({"rules", "default_tier", "policies", "cache"})


def pick_model(tier: Tier, allow_models: Sequence[str] | None, catalog: Catalog) -> ModelSpec:
    """The cheapest allowed model of ``tier``; else of the nearest tier up the ladder, then down.

    Never returns a model outside ``allow_models`` (None allows every model): pinning beats cost.
    """
    allowed = None if allow_models is None else frozenset(allow_models)
    start = TIER_LADDER.index(tier)
    order = TIER_LADDER[start:] + TIER_LADDER[:start][::-1]
    for candidate_tier in order:
        candidates = [m for m in catalog.in_tier(candidate_tier) if allowed is None or m.name in allowed]
        if candidates:
            # Output tokens dominate a call's price; input price and name only break ties, deterministically.
            return min(candidates, key=lambda m: (m.output_usd_per_mtok, m.input_usd_per_mtok, m.name))
    raise PinningError(tier, allow_models or [])


def resolve_model(name: str, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
    """``name`` itself when the step allows it; otherwise, as the rules do, the cheapest allowed
    model of its tier (one tier down under pacing's downgrade), never one outside the allow-list."""
    model = catalog.model(name)
    if not downgrade and (step.allow_models is None or name in step.allow_models):
        return model
    return pick_model(tier_below(model.tier) if downgrade else model.tier, step.allow_models, catalog)


@dataclass(frozen=True)
class RoutingTable:
    rules: tuple[Rule, ...]
    default_tier: Tier

    @classmethod
    def load(cls, deploy_dir: Path) -> RoutingTable:
        path = deploy_dir / ROUTING_FILE
        return cls.parse(tomllib.loads(path.read_text()), str(path))

    @classmethod
    def parse(cls, raw: dict[str, Any], source: str = ROUTING_FILE) -> RoutingTable:
        unknown = set(raw) - _TABLE_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; known: {sorted(_TABLE_KEYS)}")
        rules = []
        for index, entry in enumerate(raw.get("rules", [])):
            unknown = set(entry) - _RULE_KEYS
            if unknown:
                raise ValueError(f"{source}: rule {index}: unknown keys {sorted(unknown)}; known: {sorted(_RULE_KEYS)}")
            rule = Rule(**entry)
            _check_tier(rule.tier, f"{source}: rule {index}")
            low, high = rule.min_prompt_chars, rule.max_prompt_chars
            if low is not None and high is not None and low > high:
                raise ValueError(f"{source}: rule {index}: min_prompt_chars {low} > max_prompt_chars {high}")
            rules.append(rule)
        default_tier = raw.get("default_tier", "frontier")
        _check_tier(default_tier, f"{source}: default_tier")
        return cls(rules=tuple(rules), default_tier=default_tier)

    def tier(self, step: StepRequest, prompt_chars: int) -> Tier:
        for rule in self.rules:
            if rule.matches(step, prompt_chars):
                return rule.tier
        return self.default_tier

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        """The model that runs ``step``; raises PinningError when its allow-list permits none.

        ``downgrade`` (pacing) moves the table's tier one step down the ladder first; pick_model
        still never leaves the allow-list, so a step pinned to one tier stays on it.
        """
        tier = self.tier(step, prompt_chars(step))
        return pick_model(tier_below(tier) if downgrade else tier, step.allow_models, catalog)


def prompt_chars(step: StepRequest) -> int:
    """A step's prompt size as the table's thresholds measure it: the characters of its messages.

    Not tokens: a rule picks the tier before the model, and so the tokenizer, is known, and
    tokenizing would cost more than the rest of the decision together (docs/benchmarks.md,
    "Routing decision latency"). A size rule only needs to tell short from long; where the exact
    count matters, the reservation's worst case, the router counts tokens with the chosen model's
    tokenizer.
    """
    return sum(len(m.content) for m in step.messages)


def tier_below(tier: Tier) -> Tier:
    """One step down the ladder (frontier -> mid -> local); local stays local."""
    return TIER_LADDER[max(TIER_LADDER.index(tier) - 1, 0)]


def _check_tier(tier: str, where: str) -> None:
    if tier not in TIER_LADDER:
        raise ValueError(f"{where}: tier {tier!r} must be one of {TIER_LADDER}")
