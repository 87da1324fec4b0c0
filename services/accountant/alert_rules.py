"""Spend alert rules (deploy/alerts.toml): what an alert watches, read and checked before the accountant starts.

Three kinds, each over the metered spend of one scope (``SCOPES``):

- ``spend``: spend in a window above ``threshold_usd``. Windows are fixed and UTC-aligned: a duration that
  divides a day (``15m``, ``1h``, ``6h``, ``1d``; ``1h`` is 14:00-15:00, not "the last 60 minutes"), or
  the calendar ``day`` or ``month``. A fixed window is what "once per window" can be said of, and what an
  operator can find again in ClickHouse; a spike across a boundary is split, so pick a window at most half
  the time a runaway may run unseen.
- ``anomaly``: an hour's spend outside the band ``mean +- sigmas * stdev`` of the ``trailing_hours``
  complete hours before it (population stdev, hours without spend counted as 0), and at least ``min_usd``
  away from the mean (so a flat history, stdev 0, does not fire on a cent). "above" is judged on the
  running hour, so a runaway alerts within the hour; "below" (spend that stopped) only on the last
  complete hour, since a running hour is always below until it ends. A scope value without spend in the
  trailing hours has no band yet and is not judged (the spend kind covers a new tenant).
- ``cap``: spend in the current UTC ``day`` or ``month`` at ``percent`` % of the scope's budget cap in
  force (deploy/budgets.toml and `frugalmesh budget set`); only scopes that have caps.

``key = "*"`` (the default) watches every value of the scope, each on its own; ``tenant`` narrows any scope
to one tenant's calls. Any unknown key or table, or a value out of range, is an error naming the file and
rule: a misspelt threshold must not leave spend unwatched in silence.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALERTS_FILE = "alerts.toml"
KINDS = ("spend", "anomaly", "cap")
# Scopes a rule can group spend by: usage_events columns, and the task's workflow (task_events).
SCOPES = ("global", "tenant", "key", "agent", "model", "tier", "provider", "workflow")
# Scopes that have budget caps (deploy/budgets.toml).
CAP_SCOPES = ("global", "tenant", "model", "key")
CALENDAR_WINDOWS = ("day", "month")
DIRECTIONS = ("above", "below", "both")
DAY_S = 86_400
HOUR_S = 3_600
_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": HOUR_S, "d": DAY_S}

COMMON_KEYS = {"kind", "scope", "key", "tenant", "webhook"}
KIND_KEYS = {
    "spend": {"window", "threshold_usd"},
    "anomaly": {"trailing_hours", "sigmas", "min_usd", "direction"},
    "cap": {"window", "percent"},
}


@dataclass(frozen=True)
class AlertRule:
    name: str
    kind: str
    scope: str
    # One value of the scope, or "*": every value, each alerting on its own.
    key: str = "*"
    # Only this tenant's calls count; "": every tenant's.
    tenant: str = ""
    # spend: a duration ("1h") or "day"/"month"; cap: "day"/"month"; anomaly: "1h".
    window: str = "1h"
    threshold_usd: float = 0.0
    trailing_hours: int = 24
    sigmas: float = 3.0
    min_usd: float = 0.0
    direction: str = "above"
    percent: float = 0.0
    webhook: str = ""


@dataclass(frozen=True)
class AlertConfig:
    """The rules, and how often the accountant evaluates them."""

    rules: tuple[AlertRule, ...] = ()
    interval_s: float = 60.0

    @classmethod
    def load(cls, path: Path) -> AlertConfig:
        """Read ``path``; a missing file means no rules. A ValueError names the file and the rule at fault."""
        if not path.is_file():
            return cls()
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        unknown = sorted(set(raw) - {"interval_s", "rules"})
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected interval_s and [rules.<name>] tables")
        interval_s = _number(f"{path}", raw, "interval_s", 60.0, positive=True)
        rules = raw.get("rules", {})
        if not isinstance(rules, dict):
            raise ValueError(f"{path}: rules must be tables, [rules.<name>]")
        return cls(tuple(_rule(f"{path}: [rules.{name}]", name, spec) for name, spec in rules.items()), interval_s)


def _rule(where: str, name: str, spec: Any) -> AlertRule:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a rule is a table of keys (kind, scope, ...)")
    if not re.match(r"^[A-Za-z0-9_\-]+$", name):
        raise ValueError(f"{where}: a rule's name uses letters, digits, '-' and '_'")
    kind = _choice(where, spec, "kind", KINDS, None)
    allowed = COMMON_KEYS | KIND_KEYS[kind]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} for a {kind} rule; known: {', '.join(sorted(allowed))}")
    scope = _choice(where, spec, "scope", CAP_SCOPES if kind == "cap" else SCOPES, None)
    key = _text(where, spec, "key", "*")
    if scope == "global" and key != "*":
        raise ValueError(f"{where}: a global rule has no key (it watches all spend)")
    webhook = _text(where, spec, "webhook", "")
    if webhook and not webhook.startswith(("http://", "https://")):
        raise ValueError(f"{where}: webhook must be an http:// or https:// URL, not {webhook!r}")
    common: dict[str, Any] = {"name": name, "kind": kind, "scope": scope, "key": key, "webhook": webhook}
    common["tenant"] = _text(where, spec, "tenant", "")
    if kind == "spend":
        window = _text(where, spec, "window", None)
        window_length_s(where, window)
        threshold = _number(where, spec, "threshold_usd", None, positive=True)
        return AlertRule(**common, window=window, threshold_usd=threshold)
    if kind == "anomaly":
        trailing = _number(where, spec, "trailing_hours", 24, positive=True)
        if trailing != int(trailing) or trailing < 2:
            raise ValueError(f"{where}: trailing_hours must be a whole number of hours, at least 2, not {trailing!r}")
        return AlertRule(
            **common,
            window="1h",
            trailing_hours=int(trailing),
            sigmas=_number(where, spec, "sigmas", 3.0, positive=True),
            min_usd=_number(where, spec, "min_usd", 0.0),
            direction=_choice(where, spec, "direction", DIRECTIONS, "above"),
        )
    percent = _number(where, spec, "percent", None, positive=True)
    return AlertRule(**common, window=_choice(where, spec, "window", CALENDAR_WINDOWS, None), percent=percent)


def window_length_s(where: str, window: str) -> int | None:
    """A spend window's length in seconds (None for the calendar month); a ValueError for one that is
    neither a calendar window nor a duration dividing a UTC day."""
    if window == "month":
        return None
    if window == "day":
        return DAY_S
    match = _DURATION.match(window)
    length = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not length or DAY_S % length:
        raise ValueError(
            f"{where}: window {window!r} must be day, month or a duration dividing a day (15m, 1h, 6h, 1d)"
        )
    return length


def _choice(where: str, spec: dict, key: str, choices: tuple[str, ...], default: str | None) -> str:
    value = spec.get(key, default)
    if value is None:
        raise ValueError(f"{where}: missing key {key!r} (one of {', '.join(choices)})")
    if value not in choices:
        raise ValueError(f"{where}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _text(where: str, spec: dict, key: str, default: str | None) -> str:
    if key not in spec:
        if default is None:
            raise ValueError(f"{where}: missing key {key!r}")
        return default
    value = spec[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def _number(where: str, spec: dict, key: str, default: float | None, *, positive: bool = False) -> float:
    value = spec.get(key, default)
    if value is None:
        raise ValueError(f"{where}: missing key {key!r}")
    # bool is an int to Python, but `threshold_usd = true` is a mistake, not $1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a number, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{where}: {key} must be {'> 0' if positive else '>= 0'}, not {value!r}")
    return float(value)
