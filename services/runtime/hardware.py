"""Hardware profiles (deploy/hardware.toml): what a token costs on hardware the mesh runs itself.

Local cost is not zero. A profile turns a machine's hourly cost (its purchase price spread over
its lifetime, or its rent) plus its power bill into a price per million tokens, at the throughput
measured on it and the share of hours it does useful work:

    usd_per_hour = hardware_usd_per_hour + watts / 1000 * usd_per_kwh
    usd_per_mtok = usd_per_hour / (tokens_per_s * 3600 * utilisation) * 1e6

Input (prefill) and output (decode) tokens are priced from their own measured rates, so local
models carry prices in the same unit as the providers' list prices and the router compares like
with like.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOURS_PER_YEAR = 365 * 24
SECONDS_PER_HOUR = 3600
MILLION = 1_000_000

REQUIRED = ("watts", "usd_per_kwh", "utilisation", "input_tokens_per_s", "output_tokens_per_s")
# Bought (purchase_usd and one lifetime) or rented (hourly_usd).
HARDWARE_COST = ("purchase_usd", "lifetime_years", "lifetime_hours", "hourly_usd")
# Any other key is a typo (e.g. "utilization") and an error, not a figure silently left out.
KNOWN_KEYS = frozenset(REQUIRED + HARDWARE_COST)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    # The machine's own cost per wall-clock hour: purchase_usd / lifetime hours, or the rent.
    hardware_usd_per_hour: float
    # Average draw at the wall while it serves; usd_per_kwh is 0 where the rent includes power.
    watts: float
    usd_per_kwh: float
    # The share of all hours it spends generating at the measured rates (0 < utilisation <= 1).
    utilisation: float
    # Measured throughput: prefill (input) and decode (output) tokens per second.
    input_tokens_per_s: float
    output_tokens_per_s: float

    @property
    def usd_per_hour(self) -> float:
        return self.hardware_usd_per_hour + self.watts / 1000 * self.usd_per_kwh

    @property
    def input_usd_per_mtok(self) -> float:
        return self._usd_per_mtok(self.input_tokens_per_s)

    @property
    def output_usd_per_mtok(self) -> float:
        return self._usd_per_mtok(self.output_tokens_per_s)

    def _usd_per_mtok(self, tokens_per_s: float) -> float:
        useful_tokens_per_hour = tokens_per_s * SECONDS_PER_HOUR * self.utilisation
        return self.usd_per_hour / useful_tokens_per_hour * MILLION


def load_profiles(path: Path) -> dict[str, HardwareProfile]:
    """Every ``[profiles.<name>]`` of ``path``; a ValueError names the file, profile and key at fault."""
    raw = tomllib.loads(path.read_text())
    return {name: _profile(path, name, spec) for name, spec in raw.get("profiles", {}).items()}


def _profile(path: Path, name: str, spec: dict[str, Any]) -> HardwareProfile:
    where = f"{path}: [profiles.{name}]"
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(KNOWN_KEYS))}")
    missing = [key for key in REQUIRED if key not in spec]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")
    return HardwareProfile(
        name=name,
        hardware_usd_per_hour=_hardware_usd_per_hour(where, spec),
        watts=_number(where, spec, "watts"),
        usd_per_kwh=_number(where, spec, "usd_per_kwh"),
        utilisation=_number(where, spec, "utilisation", positive=True, at_most=1.0),
        input_tokens_per_s=_number(where, spec, "input_tokens_per_s", positive=True),
        output_tokens_per_s=_number(where, spec, "output_tokens_per_s", positive=True),
    )


def _hardware_usd_per_hour(where: str, spec: dict[str, Any]) -> float:
    """A rented machine's ``hourly_usd``, or a bought one's ``purchase_usd`` over its lifetime."""
    if "hourly_usd" in spec:
        clashing = [key for key in ("purchase_usd", "lifetime_years", "lifetime_hours") if key in spec]
        if clashing:
            raise ValueError(
                f"{where}: set hourly_usd (rented) or purchase_usd and a lifetime (bought), not both ({clashing[0]!r})"
            )
        return _number(where, spec, "hourly_usd")
    if "purchase_usd" not in spec:
        raise ValueError(f"{where}: missing key 'purchase_usd' (bought) or 'hourly_usd' (rented)")
    lifetimes = [key for key in ("lifetime_years", "lifetime_hours") if key in spec]
    if len(lifetimes) != 1:
        raise ValueError(f"{where}: set exactly one of 'lifetime_years' or 'lifetime_hours' with purchase_usd")
    [lifetime] = lifetimes
    hours = _number(where, spec, lifetime, positive=True) * (HOURS_PER_YEAR if lifetime == "lifetime_years" else 1)
    return _number(where, spec, "purchase_usd") / hours


def _number(where: str, spec: dict[str, Any], key: str, *, positive: bool = False, at_most: float = math.inf) -> float:
    value = spec[key]
    # bool is an int to Python, but `watts = true` is a mistake, not 1 W.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a number, not {value!r}")
    too_small = value <= 0 if positive else value < 0
    if too_small or value > at_most:
        bound = "> 0" if positive else ">= 0"
        if at_most != math.inf:
            bound += f" and <= {at_most:g}"
        raise ValueError(f"{where}: {key} must be {bound}, not {value!r}")
    return float(value)
