"""`frugalmesh tco`: seed 000's break-even reproduced, then this mesh's API traffic priced on owned hardware
(services/economics/tco.py)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import click

_DURATION = re.compile(r"^([1-9][0-9]*)([hdw])$")
_UNIT_S = {"h": 3_600, "d": 86_400, "w": 7 * 86_400}


def _since_s(value: str) -> float:
    match = _DURATION.match(value)
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration: write it as 12h, 7d or 2w", param_hint="--since")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@click.command()
@click.option(
    "--hardware",
    "hardware_name",
    default="rtx4080-owned",
    show_default=True,
    help="The hardware profile of deploy/hardware.toml to price the mesh's traffic on.",
)
@click.option("--since", default="7d", show_default=True, help="The traffic window: 12h, 7d, 2w.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the plot (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def tco(hardware_name: str, since: str, plot_path: Path | None, as_json: bool) -> None:
    """Owning hardware against paying per token: seed 000's "9.1M output tokens/day for an RTX 4080"
    recomputed with its assumptions, then each API model's tokens/day in ClickHouse, the utilisation the
    --hardware profile would run at and the dollars a day owning it would save or lose."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from services.economics.tco import (
        REFERENCE_PROFILE,
        mesh_traffic,
        profile_assumptions,
        reproduce,
    )
    from services.embedded.servers import EmbeddedError
    from services.embedded.stack import clickhouse_for_queries, client_settings
    from services.runtime.bus import now_ms
    from services.runtime.catalog import Catalog
    from services.runtime.hardware import load_profiles

    since_s = _since_s(since)
    settings = client_settings()
    hardware_path = settings.deploy_dir / "hardware.toml"
    try:
        profiles = load_profiles(hardware_path)
        catalog = Catalog.load(settings.deploy_dir)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if hardware_name not in profiles:
        raise click.BadParameter(
            f"no profile {hardware_name!r} in {hardware_path}; known: {', '.join(sorted(profiles))}",
            param_hint="--hardware",
        )
    if REFERENCE_PROFILE not in profiles:
        raise click.ClickException(
            f"{hardware_path} has no [profiles.{REFERENCE_PROFILE}], the card seed 000's claim is recomputed "
            "from: copy it from the shipped deploy/hardware.toml"
        )
    api_prices = {m.name: m.output_usd_per_mtok for m in catalog.models.values() if m.tier != "local"}
    reference = reproduce(
        profiles[REFERENCE_PROFILE], profile_assumptions(hardware_path, REFERENCE_PROFILE), api_prices
    )
    profile = profiles[hardware_name]
    if not as_json:  # the reproduction needs no mesh: shown even when ClickHouse cannot be reached
        _print_reference(reference)
    try:
        with clickhouse_for_queries(settings) as target:
            client = clickhouse_connect.get_client(dsn=target.url)
            if not client.database:
                raise click.ClickException(
                    f"no database in {target.url.rsplit('@', 1)[-1]}: end the URL with /frugalmesh"
                )
            window, traffic = mesh_traffic(client, client.database, profile, since_s, now_ms())
    except (ClickHouseError, EmbeddedError, OSError) as exc:
        raise click.ClickException(
            f"cannot read the mesh's traffic from ClickHouse: {exc}\nIs the mesh up (`frugalmesh up`), or "
            "CLICKHOUSE_URL set?"
        ) from None

    if plot_path is not None:
        from services.economics.tco_plot import plot_tco

        plot_tco(plot_path, reference, traffic)
    if as_json:
        click.echo(json.dumps(_as_json(reference, profile, window, traffic, since)))
        return
    _print_traffic(profile, window, traffic)
    if plot_path is not None:
        click.echo(f"plot: {plot_path}")


def _as_json(reference, profile, window, traffic, since: str) -> dict:
    from services.economics.tco import REFERENCE_CLAIM_TOKENS_PER_DAY, owning_usd_per_day

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "reference": {
            "claim_output_tokens_per_day": REFERENCE_CLAIM_TOKENS_PER_DAY,
            "profile": reference.profile.name,
            "assumptions": reference.assumptions,
            "hardware_usd_per_hour": reference.profile.hardware_usd_per_hour,
            "power_usd_per_hour": reference.profile.usd_per_hour - reference.profile.hardware_usd_per_hour,
            "owning_usd_per_day": reference.owning_usd_per_day,
            "api_usd_per_mtok_output": reference.api_usd_per_mtok,
            "break_even_output_tokens_per_day": reference.break_even_tokens_per_day,
            "capacity_output_tokens_per_day": reference.capacity_tokens_per_day,
            "utilisation_at_break_even": reference.utilisation_at_break_even,
            "holds": reference.holds,
            "against_api_models": [
                {"model": name, "api_usd_per_mtok_output": price, "break_even_output_tokens_per_day": n}
                for name, price, n in reference.against
            ],
        },
        "hardware": {"profile": profile.name, "owning_usd_per_day": owning_usd_per_day(profile)},
        "window": {"since": since, "start_ms": window.start_ms, "end_ms": window.end_ms, "days": window.days},
        "models": [asdict(t) | {"break_even_tokens_per_day": finite(t.break_even_tokens_per_day)} for t in traffic],
    }


def _print_reference(reference) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from services.economics.tco import REFERENCE_CLAIM_TOKENS_PER_DAY

    console = Console(width=160)
    p = reference.profile
    title = escape(f"Seed 000's claim recomputed: [profiles.{p.name}]")
    stated = Table("assumption (deploy/hardware.toml)", "value", title=title)
    for key, value in reference.assumptions.items():
        stated.add_row(key, f"{value:,}" if isinstance(value, int | float) else str(value))
    stated.add_row("API price compared with", f"${reference.api_usd_per_mtok:g} per million output tokens")
    console.print(stated)
    verdict = "reproduced" if reference.holds else "NOT reproduced"
    console.print(
        f"owning: ${p.hardware_usd_per_hour:.4f}/h of hardware + ${p.usd_per_hour - p.hardware_usd_per_hour:.4f}/h "
        f"of power = ${reference.owning_usd_per_day:.2f}/day\n"
        f"break-even: ${reference.owning_usd_per_day:.4f} / ${reference.api_usd_per_mtok:g} per Mtok = "
        f"{reference.break_even_tokens_per_day / 1e6:.2f}M output tokens/day "
        f"(claim {REFERENCE_CLAIM_TOKENS_PER_DAY / 1e6:.1f}M: {verdict}); one card makes at most "
        f"{reference.capacity_tokens_per_day / 1e6:.2f}M/day at {p.output_tokens_per_s:g} tokens/s, so it pays "
        f"only {reference.utilisation_at_break_even:.0%} busy or more"
    )
    against = Table("API model", "output $/Mtok", "break-even output tokens/day", title=f"{p.name} against")
    for name, price, n in reference.against:
        against.add_row(name, f"{price:g}", f"{n:,.0f}")
    console.print(against)


def _print_traffic(profile, window, traffic) -> None:
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    from services.economics.tco import owning_usd_per_day

    console = Console(width=160)
    start = datetime.fromtimestamp(window.start_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
    console.print(
        f"\nThis mesh's API traffic from {start} UTC ({window.days:.2f} days), on {profile.name} "
        f"(${owning_usd_per_day(profile):.2f}/day a machine):"
    )
    if not traffic:
        console.print("no API calls in the window (every call local, or none at all): nothing to move")
        return
    table = Table(
        "model",
        "calls",
        "input tok/day",
        "output tok/day",
        "API $/day",
        "utilisation",
        "machines",
        "owning $/day",
        "owning saves $/day",
        "break-even out tok/day",
    )
    for t in traffic:
        table.add_row(
            t.model,
            f"{t.calls:,}",
            f"{t.input_tokens_per_day:,.0f}",
            f"{t.output_tokens_per_day:,.0f}",
            f"{t.api_usd_per_day:.4f}",
            f"{t.utilisation:.2%}",
            str(t.machines),
            f"{t.owning_usd_per_day:.2f}",
            f"{t.saving_usd_per_day:+.4f}",
            f"{t.break_even_tokens_per_day:,.0f}" if math.isfinite(t.break_even_tokens_per_day) else "never",
        )
    console.print(table)
