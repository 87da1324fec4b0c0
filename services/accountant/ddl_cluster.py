"""The accountant's schema for a ClickHouse cluster (`frugalmesh schema ddl --cluster NAME`), derived
from the single-node statements of ``ddl.py``, so a table or view added there has its cluster form
without a second copy to keep in step.

Each single-node statement becomes:

- ``CREATE TABLE db.t (...) ENGINE = XMergeTree ...``: ``db.t_local`` ON CLUSTER, engine
  ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')`` (the
  server's macros name the shard and replica; ``{database}`` and ``{table}`` are ClickHouse's own),
  and ``db.t`` ON CLUSTER as ``Distributed`` over it, sharded by ``cityHash64`` of the table's
  ORDER BY key. The key decides the shard, so every copy of a row lands in the same shard and
  ReplacingMergeTree's ``FINAL`` (which the views read) stays exact across shards. The accountant
  reads and writes ``db.t`` as on one node: its statements do not change.
- ``ALTER TABLE db.t ...``: the same change ON CLUSTER to ``db.t_local``, and a column change to
  ``db.t`` too (a Distributed table has columns, but no indexes, TTLs or projections).
- ``CREATE VIEW``: ON CLUSTER, over the Distributed tables, as written.
- ``CREATE MATERIALIZED VIEW``: ON CLUSTER, fed by the local tables (a view on a Distributed
  table would see no insert: the rows are inserted into the shards' local tables) and writing to
  the local table of its ``TO`` target; an inner engine becomes its Replicated form.

A statement of any other shape raises ``UnsupportedStatement``: tests/test_ddl_cluster.py derives
every statement of ``ddl.statements``, so a new shape fails there, not on an operator's cluster.

Deliberately not done: creating the database (``CREATE DATABASE ... ON CLUSTER`` is printed first,
the operator runs it), Keeper and macros configuration (docs/deploy.md), and shard rebalancing.
Inserts through a Distributed table are queued on the receiving node unless
``distributed_foreground_insert = 1`` (docs/deploy.md sets it in the writer's profile), so an
acknowledged row is on a replica before the accountant acks its message.
"""

from __future__ import annotations

import re

from services.accountant.ddl import quote_identifier, statements

LOCAL_SUFFIX = "_local"
REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
CLUSTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

_NAME = r"(?P<db>`(?:[^`\\]|\\.)*`)\.(?P<name>\w+)"
_CREATE_TABLE = re.compile(rf"^CREATE TABLE IF NOT EXISTS {_NAME}\s*\(", re.S)
_ALTER_TABLE = re.compile(rf"^ALTER TABLE {_NAME}\s+(?P<change>\w+\s+\w+)", re.S)
_COLUMN_CHANGES = {"ADD COLUMN", "DROP COLUMN", "MODIFY COLUMN", "RENAME COLUMN", "COMMENT COLUMN"}
_CREATE_VIEW = re.compile(rf"^CREATE VIEW IF NOT EXISTS {_NAME}\s+AS\s", re.S)
_CREATE_MATERIALIZED = re.compile(rf"^CREATE MATERIALIZED VIEW IF NOT EXISTS {_NAME}\s", re.S)
_ENGINE = re.compile(r"ENGINE\s*=\s*(?P<engine>\w*MergeTree)\b(?:\s*\((?P<args>[^)]*)\))?")
_ORDER_BY = re.compile(r"ORDER BY\s+(?:\((?P<tuple>[^)]*)\)|(?P<one>[^\s,]+))")
_COMMENT = re.compile(r"--[^\n]*")


class UnsupportedStatement(ValueError):
    """A single-node statement this module cannot give a cluster form."""


def one_line(statement: str) -> str:
    """``statement`` without its SQL comments, on one line."""
    return " ".join(_COMMENT.sub("", statement).split())


def _replicated(match: re.Match[str]) -> str:
    args = [f"'{REPLICA_PATH}'", "'{replica}'"]
    if match.group("args"):
        args.append(match.group("args").strip())
    return f"ENGINE = Replicated{match.group('engine')}({', '.join(args)})"


def _on_cluster(statement: str, match: re.Match[str], cluster: str, name: str | None = None) -> str:
    """``statement`` with its object renamed to ``name`` (if given) and ON CLUSTER after the name."""
    target = f"{match.group('db')}.{name or match.group('name')} ON CLUSTER {quote_identifier(cluster)}"
    return statement[: match.start("db")] + target + statement[match.end("name") :]


def _sharding_key(statement: str) -> str:
    order = _ORDER_BY.search(statement)
    if order is None:
        raise UnsupportedStatement(f"a table without ORDER BY has no sharding key: {statement[:80]}")
    return f"cityHash64({order.group('tuple') or order.group('one')})"


def _table(statement: str, match: re.Match[str], cluster: str) -> list[str]:
    db, name = match.group("db"), match.group("name")
    local = name + LOCAL_SUFFIX
    if _ENGINE.search(statement) is None:
        raise UnsupportedStatement(f"table {name}: only MergeTree-family engines have a replicated form")
    replicated = _ENGINE.sub(_replicated, _on_cluster(statement, match, cluster, local), count=1)
    distributed = (
        f"CREATE TABLE IF NOT EXISTS {db}.{name} ON CLUSTER {quote_identifier(cluster)} AS {db}.{local} "
        f"ENGINE = Distributed('{cluster}', {db}, {local}, {_sharding_key(statement)})"
    )
    return [replicated, distributed]


def _materialized(statement: str, match: re.Match[str], cluster: str, tables: set[str]) -> str:
    db = re.escape(match.group("db"))
    body = _on_cluster(statement, match, cluster)
    # Fed by (and writing to) the shards' local tables, where the inserted rows land.
    body = re.sub(rf"({db})\.({'|'.join(map(re.escape, tables))})\b", rf"\1.\2{LOCAL_SUFFIX}", body)
    return _ENGINE.sub(_replicated, body, count=1)


def cluster_form(statement: str, cluster: str, tables: set[str]) -> list[str]:
    """The cluster statements standing for one single-node ``statement``; ``tables``: the names of
    every table the schema creates (a materialized view reading them reads their local tables)."""
    text = one_line(statement)
    if match := _CREATE_TABLE.match(text):
        return _table(text, match, cluster)
    if match := _ALTER_TABLE.match(text):
        local = _on_cluster(text, match, cluster, match.group("name") + LOCAL_SUFFIX)
        if " ".join(match.group("change").upper().split()) in _COLUMN_CHANGES:
            return [local, _on_cluster(text, match, cluster)]
        return [local]
    if match := _CREATE_VIEW.match(text):
        return [_on_cluster(text, match, cluster)]
    if match := _CREATE_MATERIALIZED.match(text):
        return [_materialized(text, match, cluster, tables)]
    raise UnsupportedStatement(f"no cluster form for: {text[:120]}")


def cluster_statements(database: str, cluster: str) -> list[str]:
    """The whole schema for ``cluster``: the database, then every table, column and view of
    ``ddl.statements(database)`` in its cluster form, in the same order."""
    if not CLUSTER_NAME.match(cluster):
        raise ValueError(f"cluster name {cluster!r}: letters, digits, '_' and '-', starting with a letter or '_'")
    single = statements(database)
    tables = {m.group("name") for s in single if (m := _CREATE_TABLE.match(one_line(s)))}
    on_cluster = f"ON CLUSTER {quote_identifier(cluster)}"
    forms = [form for statement in single for form in cluster_form(statement, cluster, tables)]
    return [f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)} {on_cluster}", *forms]
