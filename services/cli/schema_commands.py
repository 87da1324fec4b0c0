"""`frugalmesh schema ddl [--cluster NAME]`: the accountant's ClickHouse schema as SQL, for an operator to
review and run: the single-node statements the accountant runs itself (services/accountant/ddl.py), or
their form for a ClickHouse cluster (services/accountant/ddl_cluster.py), run once before the
accountant starts against it."""

from __future__ import annotations

import click


@click.group()
def schema() -> None:
    """The accountant's ClickHouse schema."""


@schema.command("ddl")
@click.option(
    "--cluster",
    default="",
    help="The ClickHouse cluster's name (remote_servers): print the replicated, Distributed form, ON CLUSTER.",
)
@click.option(
    "--database",
    default="",
    help="The database to create the tables in [the database of CLICKHOUSE_URL: frugalmesh by default].",
)
def schema_ddl(cluster: str, database: str) -> None:
    """Print every CREATE and ALTER statement of the schema, each ending with ';'."""
    from urllib.parse import urlparse

    from services.accountant.ddl import statements
    from services.accountant.ddl_cluster import cluster_statements, one_line
    from services.runtime.settings import MeshSettings

    database = database or urlparse(MeshSettings().clickhouse_url).path.strip("/")
    if not database:
        raise click.ClickException("no database: pass --database NAME or give CLICKHOUSE_URL a path (…/frugalmesh)")
    try:
        ddl = cluster_statements(database, cluster) if cluster else [one_line(s) for s in statements(database)]
    except ValueError as exc:
        raise click.ClickException(f"{exc}; pass the cluster's name as in the servers' <remote_servers>") from None
    click.echo("\n\n".join(f"{statement};" for statement in ddl))
