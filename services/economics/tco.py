"""`frugalmesh tco`: owning hardware against paying per token, the break-even and this mesh's own traffic.

An owned machine costs every hour of its life whatever it does: its price spread over its lifetime plus
its power (``HardwareProfile.usd_per_hour``, deploy/hardware.toml, the formula local models are priced
with). An API costs its price per token. So, per day, for N output tokens a day:

    owning_usd_per_day = 24 * usd_per_hour                    (flat, up to the machine's capacity)
    api_usd_per_day    = N * api_usd_per_mtok / 1e6           (a straight line)
    break_even_N       = owning_usd_per_day / api_usd_per_mtok * 1e6
    capacity_N         = output_tokens_per_s * 86,400         (one machine busy all day)

Owning pays above break_even_N, and only if the machine can make that many tokens (break_even_N <=
capacity_N); past capacity it takes a second machine (a step in the owning line).

Seed 000 claims "route operations needing more than 9.1 million output tokens/day to an RTX 4080" and
states no inputs. ``reproduce`` takes the card's facts and this project's assumptions from
deploy/hardware.toml (``[profiles.rtx4080-owned]``: $1,199, 3 years, 320 W drawn every hour, $0.17/kWh:
$2.40 a day) and finds that 9.1M/day is the break-even against an API charging
``REFERENCE_API_USD_PER_MTOK`` ($0.264) per million output tokens, the price class of hosted 7-8B open
models; the same card breaks even at 4.0M/day against this mesh's mid tier (Mixtral at $0.60) and at
80,000/day against its frontier model ($30). It compares output tokens only, as the claim does.

For the mesh's own traffic (``mesh_traffic``): per API model (tier not local), the tokens a day it served
over the window (the metered calls that ran a model: cache hits and refusals left out), the share of a
day the profile's machine would be busy serving the same tokens (input at its prefill rate plus output
at its decode rate: ``utilisation``, above 1 when one machine cannot keep up, then ``machines`` =
ceil(utilisation)), and dollars a day owning would save (positive) or lose (negative) against what the
calls were billed. Each model's break-even is the output volume at which its traffic, at the same mix
of input and output, would pay for the machine (its billed dollars per output token, input included).

Deliberately not done: the local model's quality is taken as good enough for the API model's work (the
router's evaluation says where it is, docs/routing.md); no resale value, no operator time, no second
machine for availability; a rented profile is costed as rented around the clock.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from services.accountant import ddl
from services.runtime.hardware import MILLION, HardwareProfile

SECONDS_PER_DAY = 86_400
HOURS_PER_DAY = 24
MIN_WINDOW_S = 3_600  # traffic shorter than an hour is scaled to a day from an hour, not from seconds

REFERENCE_PROFILE = "rtx4080-owned"
REFERENCE_CLAIM_TOKENS_PER_DAY = 9.1e6
# The API output price at which the reference card breaks even at the claim (solved, then rounded up to
# a tenth of a cent: 2.4006 $/day / 9.1M = $0.2638 per million).
REFERENCE_API_USD_PER_MTOK = 0.264


def owning_usd_per_day(profile: HardwareProfile) -> float:
    return HOURS_PER_DAY * profile.usd_per_hour


def output_capacity_per_day(profile: HardwareProfile) -> float:
    """Output tokens one machine makes in a day of decoding and nothing else."""
    return profile.output_tokens_per_s * SECONDS_PER_DAY


def break_even_tokens_per_day(profile: HardwareProfile, api_usd_per_mtok: float) -> float:
    """Output tokens a day above which owning one ``profile`` machine costs less than the API."""
    return owning_usd_per_day(profile) / api_usd_per_mtok * MILLION


def owning_usd_per_day_for(profile: HardwareProfile, output_tokens_per_day: float) -> float:
    """What owning enough machines for ``output_tokens_per_day`` costs a day (one at least)."""
    machines = max(1, math.ceil(output_tokens_per_day / output_capacity_per_day(profile)))
    return machines * owning_usd_per_day(profile)


@dataclass(frozen=True)
class Reproduction:
    """Seed 000's claim recomputed: the assumptions as written in hardware.toml and what they give."""

    profile: HardwareProfile
    # The profile's table as written (purchase price, lifetime, watts, ...): the stated assumptions.
    assumptions: dict[str, Any]
    api_usd_per_mtok: float
    owning_usd_per_day: float
    break_even_tokens_per_day: float
    capacity_tokens_per_day: float
    # Against other API prices (name -> price per million output tokens -> break-even tokens/day).
    against: list[tuple[str, float, float]]

    @property
    def utilisation_at_break_even(self) -> float:
        return self.break_even_tokens_per_day / self.capacity_tokens_per_day

    @property
    def holds(self) -> bool:
        """Whether the assumptions give the claim (to the claim's two significant figures)."""
        return f"{self.break_even_tokens_per_day / 1e6:.1f}" == f"{REFERENCE_CLAIM_TOKENS_PER_DAY / 1e6:.1f}"


def profile_assumptions(path: Path, name: str) -> dict[str, Any]:
    """The ``[profiles.<name>]`` table of ``path`` as written, but its ``utilisation``: the break-even does
    not take one (it is the volume), and the traffic's is measured."""
    spec = dict(tomllib.loads(path.read_text())["profiles"][name])
    spec.pop("utilisation", None)
    return spec


def reproduce(
    profile: HardwareProfile,
    assumptions: dict[str, Any],
    api_prices: dict[str, float],
    api_usd_per_mtok: float = REFERENCE_API_USD_PER_MTOK,
) -> Reproduction:
    """The break-even of ``profile`` at ``api_usd_per_mtok``, and at each of ``api_prices`` (name -> USD
    per million output tokens: the catalogue's API models)."""
    return Reproduction(
        profile=profile,
        assumptions=assumptions,
        api_usd_per_mtok=api_usd_per_mtok,
        owning_usd_per_day=owning_usd_per_day(profile),
        break_even_tokens_per_day=break_even_tokens_per_day(profile, api_usd_per_mtok),
        capacity_tokens_per_day=output_capacity_per_day(profile),
        against=[
            (name, price, break_even_tokens_per_day(profile, price))
            for name, price in sorted(api_prices.items(), key=lambda item: item[1])
        ],
    )


@dataclass(frozen=True)
class ModelTraffic:
    """One API model's traffic over the window, per day, and what owning the profile would do to it."""

    model: str
    provider: str
    tier: str
    calls: int
    input_tokens_per_day: float
    output_tokens_per_day: float
    api_usd_per_day: float
    # Busy share of one machine's day serving the same tokens; above 1, one machine cannot keep up.
    utilisation: float
    machines: int
    owning_usd_per_day: float
    # api_usd_per_day - owning_usd_per_day: what owning saves a day (negative: what it loses).
    saving_usd_per_day: float
    # Billed dollars per million output tokens, the input they needed included.
    api_usd_per_mtok_output: float
    # Output tokens a day at which this traffic (same mix) would pay for one machine; inf: never billed.
    break_even_tokens_per_day: float


@dataclass(frozen=True)
class TrafficWindow:
    """The span the per-day figures are averaged over: from the window's start or the first API call in
    it, whichever is later, to now (an hour at least)."""

    start_ms: int
    end_ms: int

    @property
    def days(self) -> float:
        return max(self.end_ms - self.start_ms, MIN_WINDOW_S * 1000) / 1000 / SECONDS_PER_DAY


def mesh_traffic(
    ch: Client, database: str, profile: HardwareProfile, since_s: float, now_ms: int
) -> tuple[TrafficWindow, list[ModelTraffic]]:
    """Each API model's traffic in the ``since_s`` before ``now_ms`` (usage_events), priced on ``profile``."""
    db = ddl.quote_identifier(database)
    rows = ch.query(
        "SELECT model, provider, tier, count() AS calls, sum(input_tokens), sum(output_tokens), "
        "sum(cost_usd), toInt64(toUnixTimestamp64Milli(min(time))) "
        f"FROM {db}.{ddl.USAGE_EVENTS} FINAL "
        "WHERE time >= fromUnixTimestamp64Milli({start:Int64}, 'UTC') "
        "AND time < fromUnixTimestamp64Milli({end:Int64}, 'UTC') "
        "AND tier != 'local' AND outcome NOT IN ('cache_hit', 'refused') "
        "GROUP BY model, provider, tier ORDER BY sum(cost_usd) DESC, model",
        parameters={"start": now_ms - int(since_s * 1000), "end": now_ms},
    ).result_rows
    first_ms = min((row[7] for row in rows), default=now_ms)
    window = TrafficWindow(max(now_ms - int(since_s * 1000), first_ms), now_ms)
    per_day = 1 / window.days
    return window, [
        _priced(profile, model, provider, tier, calls, inputs * per_day, outputs * per_day, float(cost) * per_day)
        for model, provider, tier, calls, inputs, outputs, cost, _ in rows
    ]


def _priced(
    profile: HardwareProfile,
    model: str,
    provider: str,
    tier: str,
    calls: int,
    input_per_day: float,
    output_per_day: float,
    api_usd_per_day: float,
) -> ModelTraffic:
    busy_s = input_per_day / profile.input_tokens_per_s + output_per_day / profile.output_tokens_per_s
    utilisation = busy_s / SECONDS_PER_DAY
    machines = max(1, math.ceil(utilisation))
    owning = machines * owning_usd_per_day(profile)
    price = api_usd_per_day / output_per_day * MILLION if output_per_day else 0.0
    return ModelTraffic(
        model=model,
        provider=provider,
        tier=tier,
        calls=calls,
        input_tokens_per_day=input_per_day,
        output_tokens_per_day=output_per_day,
        api_usd_per_day=api_usd_per_day,
        utilisation=utilisation,
        machines=machines,
        owning_usd_per_day=owning,
        saving_usd_per_day=api_usd_per_day - owning,
        api_usd_per_mtok_output=price,
        break_even_tokens_per_day=break_even_tokens_per_day(profile, price) if price else math.inf,
    )
