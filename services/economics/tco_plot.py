"""`frugalmesh tco --plot`: cost per day against output tokens per day, owning one profile against paying
per token, with each crossover marked and the mesh's own volumes on their API lines.

Both axes are logarithmic: the volumes that matter run from thousands to billions of tokens a day, and a
price per token is a straight line of slope 1 there, so lines of different prices stay parallel and
readable. The owning line is flat up to one machine's capacity and steps up by a machine after it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from services.economics.tco import (
    REFERENCE_CLAIM_TOKENS_PER_DAY,
    ModelTraffic,
    Reproduction,
    output_capacity_per_day,
    owning_usd_per_day_for,
)
from services.runtime.hardware import MILLION


def plot_tco(path: Path, reproduction: Reproduction, traffic: list[ModelTraffic]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = reproduction.profile
    crossings = [reproduction.break_even_tokens_per_day, *(t.break_even_tokens_per_day for t in traffic)]
    volumes = [t.output_tokens_per_day for t in traffic if t.output_tokens_per_day > 0]
    finite = [x for x in [*crossings, *volumes, output_capacity_per_day(profile)] if math.isfinite(x) and x > 0]
    low = 10 ** math.floor(math.log10(min(finite)) - 1)
    high = 10 ** math.ceil(math.log10(max(finite)) + 1)
    tokens = np.logspace(math.log10(low), math.log10(high), 400)

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    owning = [owning_usd_per_day_for(profile, n) for n in tokens]
    ax.step(tokens, owning, where="post", color="black", linewidth=2.2, label=f"owning {profile.name}")

    lines = [(f"API at ${reproduction.api_usd_per_mtok:g}/Mtok (seed 000's break-even)", reproduction.api_usd_per_mtok)]
    lines += [
        (f"{t.model} (billed ${t.api_usd_per_mtok_output:.3g}/Mtok out)", t.api_usd_per_mtok_output) for t in traffic
    ]
    for (label, price), color in zip(lines, colors, strict=False):
        if price <= 0:
            continue
        ax.plot(tokens, tokens * price / MILLION, color=color, label=label)
        crossing = reproduction.owning_usd_per_day / price * MILLION
        if low <= crossing <= high:
            ax.scatter([crossing], [reproduction.owning_usd_per_day], marker="x", s=80, color=color, zorder=3)
            ax.annotate(
                f"{_tokens(crossing)}/day",
                (crossing, reproduction.owning_usd_per_day),
                color=color,
                textcoords="offset points",
                xytext=(4, -14),
                fontsize=8,
            )
    for t, color in zip(traffic, colors[1:], strict=False):
        if t.output_tokens_per_day > 0:
            ax.scatter([t.output_tokens_per_day], [t.api_usd_per_day], s=60, color=color, edgecolor="black", zorder=4)
            ax.annotate(
                f"{t.model} now",
                (t.output_tokens_per_day, t.api_usd_per_day),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
    # x in data, y in axes fractions: the labels stay at the bottom and top whatever the dollars.
    along_x = ax.get_xaxis_transform()
    capacity = output_capacity_per_day(profile)
    ax.axvline(capacity, color="grey", linestyle="--", linewidth=1)
    ax.text(capacity, 0.02, " one machine's capacity", transform=along_x, rotation=90, va="bottom", fontsize=8)
    ax.axvline(REFERENCE_CLAIM_TOKENS_PER_DAY, color="grey", linestyle=":", linewidth=1)
    ax.text(
        REFERENCE_CLAIM_TOKENS_PER_DAY,
        0.98,
        "seed 000: 9.1M ",
        transform=along_x,
        rotation=90,
        ha="right",
        va="top",
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_xlabel("output tokens per day")
    ax.set_ylabel("USD per day")
    ax.set_title(
        f"Owning {profile.name} (${reproduction.owning_usd_per_day:.2f}/day) against paying per token\n"
        "x: break-even (crossover); dots: this mesh's traffic; dotted: seed 000's 9.1M/day",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tokens(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
