"""`frugalmesh router train --from-clickhouse`, `router versions` and `router rollback`: the router
files the mesh's own labels make, kept as versions beside the live one (docs/routing.md,
"Learning from the mesh's traffic")."""

from __future__ import annotations

from pathlib import Path

import click


def train_from_clickhouse(base: Path, out: Path, tenant: str | None, database: str | None, target: float) -> None:
    """`frugalmesh router train --from-clickhouse`: the base file plus the mesh's labels, published as
    the next version of ``out``."""
    from services.accountant.clickhouse import client
    from services.embedded.stack import clickhouse_for_queries, client_settings
    from services.router_training.feedback_labels import read_pairs, train_from_feedback
    from services.router_training.versions import publish
    from services.routing.policies.online import OnlineSettings
    from services.routing.policies.routerfile import RouterFile

    base_file = RouterFile.load(base)
    with clickhouse_for_queries(client_settings()) as target_db:
        ch = client(target_db.url)
        try:
            name = database or ch.database
            if not name:
                raise ValueError("no database named: give --database, or a CLICKHOUSE_URL ending in /<database>")
            pairs = read_pairs(ch, name, base_file.weak_model, base_file.strong_model, tenant)
        except Exception as exc:  # unreachable server, no such database or view: say which and how to fix
            raise click.ClickException(
                f"cannot read labels from ClickHouse ({exc}); is the mesh up (`frugalmesh up`) and "
                "--database the accountant's?"
            ) from None
        finally:
            ch.close()
    router_file = train_from_feedback(base_file, base, pairs, OnlineSettings(target=target), tenant)
    version, path = publish(router_file, out)
    held_out = router_file.provenance["held_out"]
    by_tag = ", ".join(f"{tag} {n}" for tag, n in router_file.provenance["labels"]["by_tag"].items())
    click.echo(f"{len(pairs)} labelled pairs ({by_tag or 'none'})")
    click.echo(f"version {version}: wrote {path}, now live as {out}")
    if "weak_share" in held_out:
        click.echo(
            f"  held out (newest {held_out['pairs']} pairs): {held_out['weak_share']:.1%} weak at accuracy "
            f"{held_out['accuracy'] / held_out['strong_accuracy']:.1%} of strong"
        )
    else:
        click.echo(f"  held out: {held_out['note']}")


@click.command()
@click.option("--router", "live", required=True, type=click.Path(dir_okay=False, path_type=Path))
def versions(live: Path) -> None:
    """List the versions of a router file: when, from which labels, held-out figures; * marks the live one."""
    from services.router_training.versions import live_version
    from services.router_training.versions import versions as kept_versions
    from services.routing.policies.routerfile import RouterFile

    current = live_version(live)
    kept = kept_versions(live)
    if not kept:
        raise click.ClickException(f"no versions of {live}: `frugalmesh router train --from-clickhouse` makes them")
    for number, path in kept.items():
        provenance = RouterFile.load(path).provenance
        labels, held_out = provenance.get("labels", {}), provenance.get("held_out", {})
        figures = (
            f"held out {held_out['weak_share']:.1%} weak at {held_out['accuracy'] / held_out['strong_accuracy']:.1%}"
            if "weak_share" in held_out
            else "held out: not judged"
        )
        mark = "*" if number == current else " "
        click.echo(
            f"{mark} v{number:04d}  {provenance.get('trained_at', '?')}  {labels.get('pairs', 0)} pairs  {figures}"
        )


@click.command()
@click.option("--router", "live", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "to", type=int, help="The version to make live (default: the one before the live one).")
def rollback(live: Path, to: int | None) -> None:
    """Make an earlier version of a router file live again; running routers pick it up without a restart."""
    from services.router_training.versions import rollback as roll_back

    try:
        version = roll_back(live, to)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{live} is version {version} again")
