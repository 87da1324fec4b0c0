"""The routing table (deploy/routing.toml) and the routing decision, as pure functions of a step.

Nothing here touches NATS, so routing policies and the decision-latency benchmark can call
``RoutingTable.choose(step, catalog)`` directly.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from schemas.messages import StepRequest, Tier
from services.runtime.catalog import TIER_LADDER, Catalog, ModelSpec
from services.runtime.tokens import TOKENIZERS, count_message_tokens_capped

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
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None

    def matches(self, step: StepRequest, prompt_tokens: int) -> bool:
        return (
            (self.workflow is None or step.workflow == self.workflow)
            and (self.role is None or step.role == self.role)
            and (self.min_prompt_tokens is None or prompt_tokens >= self.min_prompt_tokens)
            and (self.max_prompt_tokens is None or prompt_tokens <= self.max_prompt_tokens)
        )


_RULE_KEYS = frozenset(f.name for f in fields(Rule))


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


@dataclass(frozen=True)
class RoutingTable:
    rules: tuple[Rule, ...]
    default_tier: Tier
    # Prompt-size thresholds are counted in one declared tokenizer: the tier (and so the model,
    # with its own tokenizer) is not known until a rule has matched.
    prompt_tokenizer: str

    @classmethod
    def load(cls, deploy_dir: Path) -> RoutingTable:
        path = deploy_dir / ROUTING_FILE
        return cls.parse(tomllib.loads(path.read_text()), str(path))

    @classmethod
    def parse(cls, raw: dict[str, Any], source: str = ROUTING_FILE) -> RoutingTable:
        rules = []
        for index, entry in enumerate(raw.get("rules", [])):
            unknown = set(entry) - _RULE_KEYS
            if unknown:
                raise ValueError(f"{source}: rule {index}: unknown keys {sorted(unknown)}; known: {sorted(_RULE_KEYS)}")
            rule = Rule(**entry)
            _check_tier(rule.tier, f"{source}: rule {index}")
            low, high = rule.min_prompt_tokens, rule.max_prompt_tokens
            if low is not None and high is not None and low > high:
                raise ValueError(f"{source}: rule {index}: min_prompt_tokens {low} > max_prompt_tokens {high}")
            rules.append(rule)
        default_tier = raw.get("default_tier", "frontier")
        _check_tier(default_tier, f"{source}: default_tier")
        prompt_tokenizer = raw.get("prompt_tokenizer")
        if prompt_tokenizer not in TOKENIZERS:
            raise ValueError(f"{source}: prompt_tokenizer must be one of {TOKENIZERS}, not {prompt_tokenizer!r}")
        return cls(rules=tuple(rules), default_tier=default_tier, prompt_tokenizer=prompt_tokenizer)

    @cached_property
    def largest_threshold(self) -> int:
        bounds = [b for r in self.rules for b in (r.min_prompt_tokens, r.max_prompt_tokens) if b is not None]
        return max(bounds, default=0)

    def prompt_tokens(self, step: StepRequest) -> int:
        """The step's input size as the thresholds count it (contents plus chat framing): exact up
        to the largest threshold; past it, only "past every threshold" is decided (a long
        prompt's tail is never tokenized)."""
        return count_message_tokens_capped(self.prompt_tokenizer, step.messages, self.largest_threshold)

    def tier(self, step: StepRequest, prompt_tokens: int) -> Tier:
        for rule in self.rules:
            if rule.matches(step, prompt_tokens):
                return rule.tier
        return self.default_tier

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        """The model that runs ``step``; raises PinningError when its allow-list permits none.

        ``downgrade`` (pacing) moves the table's tier one step down the ladder first; pick_model
        still never leaves the allow-list, so a step pinned to one tier stays on it.
        """
        tier = self.tier(step, self.prompt_tokens(step))
        return pick_model(tier_below(tier) if downgrade else tier, step.allow_models, catalog)


def tier_below(tier: Tier) -> Tier:
    """One step down the ladder (frontier -> mid -> local); local stays local."""
    return TIER_LADDER[max(TIER_LADDER.index(tier) - 1, 0)]


def _check_tier(tier: str, where: str) -> None:
    if tier not in TIER_LADDER:
        raise ValueError(f"{where}: tier {tier!r} must be one of {TIER_LADDER}")
