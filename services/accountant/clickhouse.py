"""The one way into ClickHouse: a clickhouse-connect client from a URL, and the accountant's schema.

``frugalmesh sql`` and the accountant share these. The client is the sync one: the async client
of clickhouse-connect needs aiohttp, which the project does not depend on, so the accountant runs
its few, batched calls in a worker thread instead (``asyncio.to_thread``).
"""

from __future__ import annotations

from clickhouse_connect import get_client
from clickhouse_connect.driver.client import Client

from services.accountant import aggregates
from services.accountant.ddl import USAGE_EVENTS, quote_identifier, statements


def client(url: str) -> Client:
    """A client for ``url`` (``http://user:password@host:port/database``).

    No session id: a ClickHouse session allows one query at a time, and the accountant's
    consumers share this client from several threads.
    """
    return get_client(dsn=url, autogenerate_session_id=False)


def create_schema(ch: Client, database: str | None = None) -> str:
    """Create ``database`` (default: the client's) and every table and view in it; idempotent.

    Returns the database name, which every other statement of the accountant spells out.
    """
    database = database or ch.database
    if not database:
        raise ValueError("no ClickHouse database named: give one in the URL's path (…/frugalmesh) or as `database`")
    db = quote_identifier(database)
    ch.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    if made_for_a_cluster(ch, database):
        return database
    existing = {row[0] for row in ch.query(f"SHOW TABLES FROM {db}").result_rows}
    for statement in statements(database):
        ch.command(statement)
    # Aggregates new to an install with usage rows already stored: filled from them once.
    for statement in aggregates.backfill(db, USAGE_EVENTS, set(aggregates.AGGREGATES) - existing):
        ch.command(statement)
    return database


def made_for_a_cluster(ch: Client, database: str) -> bool:
    """Whether ``database``'s tables are Distributed ones, made by `frugalmesh schema ddl --cluster`: the
    operator runs that form (and its changes on an upgrade) ON CLUSTER, so the accountant leaves the
    schema as it is (the single-node statements do not apply: a Distributed table takes no index)."""
    found = ch.query(
        "SELECT count() FROM system.tables WHERE database = {db:String} AND engine = 'Distributed'",
        parameters={"db": database},
    )
    return bool(found.result_rows[0][0])
