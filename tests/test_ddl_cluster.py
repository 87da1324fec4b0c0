"""`frugalmesh schema ddl --cluster NAME`: the accountant's schema as replicated tables behind Distributed
ones, derived from the single-node statements (so a table or view added there is covered), parsed by
ClickHouse's own parser; and, on one node (no Keeper here), the accountant writing and the views
reading through the Distributed tables."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from helpers import eventually

from schemas.messages import UsageEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_USAGE
from services.accountant.clickhouse import client, create_schema
from services.accountant.ddl import SPEND_DAILY, TABLES, USAGE_EVENTS, VIEWS, statements
from services.accountant.ddl_cluster import LOCAL_SUFFIX, UnsupportedStatement, cluster_form, cluster_statements
from services.cli.main import cli
from services.embedded.servers import EmbeddedClickHouse
from services.runtime.bus import Bus, now_ms

CLUSTER = "mesh_cluster"
MACROS = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
# One shard of one replica, this server itself: Distributed tables work on one node.
ONE_NODE_CLUSTER = f"""
<remote_servers><{CLUSTER}><shard><replica><host>127.0.0.1</host><port>9000</port></replica></shard></{CLUSTER}>
</remote_servers>
<macros><shard>01</shard><replica>r1</replica></macros>
"""


def created(ddl: list[str], kind: str) -> set[str]:
    return {m.group(1) for s in ddl if (m := re.match(rf"CREATE {kind} IF NOT EXISTS `[^`]+`\.(\w+) ", s))}


@pytest.mark.unit
def test_every_table_is_replicated_behind_a_distributed_table_and_every_view_is_on_the_cluster():
    ddl = cluster_statements("frugalmesh", CLUSTER)
    assert ddl[0] == f"CREATE DATABASE IF NOT EXISTS `frugalmesh` ON CLUSTER `{CLUSTER}`"
    assert all(f" ON CLUSTER `{CLUSTER}`" in s for s in ddl)
    tables = created(ddl, "TABLE")
    assert set(TABLES) <= tables and {t + LOCAL_SUFFIX for t in TABLES} <= tables
    assert set(VIEWS) <= created(ddl, "VIEW")
    for table in TABLES:
        [local] = [s for s in ddl if f".{table}{LOCAL_SUFFIX} ON CLUSTER" in s and s.startswith("CREATE TABLE")]
        assert re.search(rf"ENGINE = Replicated\w*MergeTree\({re.escape(MACROS)}", local), local
        [distributed] = [s for s in ddl if f".{table} ON CLUSTER" in s and s.startswith("CREATE TABLE")]
        assert f"ENGINE = Distributed('{CLUSTER}', `frugalmesh`, {table}{LOCAL_SUFFIX}, cityHash64(" in distributed
    # Sharded by the ReplacingMergeTree key: every copy of a row meets the others on one shard.
    assert any("usage_events_local, cityHash64(event_id))" in s for s in ddl)
    assert any("task_events_local, cityHash64(task_id, kind))" in s for s in ddl)


@pytest.mark.unit
def test_a_column_change_reaches_both_tables_and_an_index_only_the_local_one():
    tables = {"t"}
    add = cluster_form("ALTER TABLE `db`.t ADD COLUMN IF NOT EXISTS c String DEFAULT '' AFTER b", "c1", tables)
    assert add == [
        "ALTER TABLE `db`.t_local ON CLUSTER `c1` ADD COLUMN IF NOT EXISTS c String DEFAULT '' AFTER b",
        "ALTER TABLE `db`.t ON CLUSTER `c1` ADD COLUMN IF NOT EXISTS c String DEFAULT '' AFTER b",
    ]
    index = cluster_form("ALTER TABLE `db`.t ADD INDEX IF NOT EXISTS i c TYPE bloom_filter GRANULARITY 1", "c1", tables)
    assert index == [
        "ALTER TABLE `db`.t_local ON CLUSTER `c1` ADD INDEX IF NOT EXISTS i c TYPE bloom_filter GRANULARITY 1"
    ]


@pytest.mark.unit
def test_a_table_and_materialized_view_added_later_get_their_cluster_form_too():
    table = """
        CREATE TABLE IF NOT EXISTS `db`.hourly (
            hour DateTime, tenant String, calls SimpleAggregateFunction(sum, UInt64)
        )
        ENGINE = AggregatingMergeTree  -- a comment saying why
        ORDER BY (hour, tenant)
    """
    view = """
        CREATE MATERIALIZED VIEW IF NOT EXISTS `db`.hourly_mv TO `db`.hourly AS
        SELECT toStartOfHour(time) AS hour, tenant, count() AS calls FROM `db`.usage_events GROUP BY hour, tenant
    """
    tables = {"hourly", "usage_events"}
    local, distributed = cluster_form(table, "c1", tables)
    assert local.startswith("CREATE TABLE IF NOT EXISTS `db`.hourly_local ON CLUSTER `c1` (")
    assert f"ENGINE = ReplicatedAggregatingMergeTree({MACROS}) ORDER BY (hour, tenant)" in local
    assert "comment" not in local
    assert distributed.endswith("ENGINE = Distributed('c1', `db`, hourly_local, cityHash64(hour, tenant))")
    [materialized] = cluster_form(view, "c1", tables)
    # Fed by the shards' local tables, where the inserted rows land.
    assert materialized.startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS `db`.hourly_mv ON CLUSTER `c1` TO `db`.hourly_local"
    )
    assert "FROM `db`.usage_events_local GROUP BY" in materialized


@pytest.mark.unit
def test_a_statement_of_another_shape_is_refused_not_passed_through():
    with pytest.raises(UnsupportedStatement, match="no cluster form"):
        cluster_form("INSERT INTO `db`.t SELECT 1", "c1", {"t"})
    with pytest.raises(UnsupportedStatement, match="MergeTree"):
        cluster_form("CREATE TABLE IF NOT EXISTS `db`.t (a String) ENGINE = Memory", "c1", {"t"})
    with pytest.raises(ValueError, match="cluster name"):
        cluster_statements("frugalmesh", "prod; DROP TABLE x")


@pytest.mark.unit
def test_the_cli_prints_either_form_and_explains_a_bad_cluster_name():
    runner = CliRunner()
    single = runner.invoke(cli, ["schema", "ddl", "--database", "billing"])
    assert single.exit_code == 0 and single.output.count(";") == len(statements("billing"))
    assert "ON CLUSTER" not in single.output and "CREATE TABLE IF NOT EXISTS `billing`.usage_events (" in single.output
    clustered = runner.invoke(cli, ["schema", "ddl", "--cluster", "prod", "--database", "billing"])
    assert clustered.exit_code == 0
    assert clustered.output.count(";\n") == len(cluster_statements("billing", "prod"))
    bad = runner.invoke(cli, ["schema", "ddl", "--cluster", "two words"])
    assert bad.exit_code != 0 and "remote_servers" in bad.output


@pytest.mark.infra
def test_clickhouse_parses_every_cluster_statement_and_runs_every_single_node_one(ch):
    for statement in cluster_statements("frugalmesh", CLUSTER):
        formatted = ch.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows[0][0]
        assert f"ON CLUSTER {CLUSTER}" in formatted, formatted
    database = "single_" + uuid.uuid4().hex[:8]
    assert create_schema(ch, database) == database
    stored = {row[0] for row in ch.query(f"SHOW TABLES FROM {database}").result_rows}
    assert set(TABLES) | set(VIEWS) <= stored


def one_node_form(statement: str) -> str:
    """The cluster statement as one node without Keeper runs it: no ON CLUSTER, unreplicated engines."""
    statement = statement.replace(f" ON CLUSTER `{CLUSTER}`", "")
    return re.sub(rf"Replicated(\w*MergeTree)\({re.escape(MACROS)}(?:, )?", r"\1(", statement)


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory) -> str:
    server = EmbeddedClickHouse(
        tmp_path_factory.mktemp("clickhouse-cluster"),
        port=0,
        config=ONE_NODE_CLUSTER,
        writer_grants=("GRANT TABLE ENGINE ON Distributed", "GRANT TABLE ENGINE ON AggregatingMergeTree"),
    )
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.infra
@pytest.mark.slow
async def test_the_accountant_writes_and_the_views_read_through_the_distributed_tables(
    one_node_cluster, settings, start_service, tmp_path: Path
):
    database = "dist_" + uuid.uuid4().hex[:8]
    ch = client(one_node_cluster)
    try:
        for statement in cluster_statements(database, CLUSTER):
            ch.command(one_node_form(statement), settings={"distributed_foreground_insert": 1})
        on_cluster = settings.model_copy(update={"clickhouse_url": one_node_cluster})
        await start_service("accountant", on_cluster, database=database, batch_timeout_s=0.05)
        bus = Bus(on_cluster, "test")
        await bus.connect()
        tenant = settings.subject_prefix
        try:
            for i in range(20):
                event = UsageEvent(
                    event_id=f"{tenant}-{i}", time_ms=now_ms(), tenant=tenant, task_id=f"task-{i % 3}",
                    call_id=f"{tenant}-{i}", service="cloud-inference", tier="mid", provider="together",
                    model="mixtral-8x7b", requested_model="mixtral-8x7b", input_tokens=10, output_tokens=5,
                    cost_usd=0.001, outcome="ok",
                )  # fmt: skip
                await bus.jetstream.publish(
                    settings.subjects.usage(tenant),
                    msgspec.json.encode(event),
                    stream=settings.subjects.stream(STREAM_USAGE),
                    headers={HEADER_MSG_ID: event.event_id},
                )
        finally:
            await bus.close()

        def through_the_views() -> bool:
            rows = ch.query(f"SELECT sum(calls), sum(cost_usd) FROM {database}.{SPEND_DAILY}").result_rows
            return rows == [(20, Decimal("0.02"))]

        await eventually(through_the_views, timeout_s=30, message="the usage rows never reached the views")
        engines = dict(ch.query(f"SELECT name, engine FROM system.tables WHERE database = '{database}'").result_rows)
        # The accountant left the cluster's schema as it found it: its rows went through Distributed.
        assert engines[USAGE_EVENTS] == "Distributed" and engines[USAGE_EVENTS + LOCAL_SUFFIX] == "ReplacingMergeTree"
        local = ch.query(f"SELECT count() FROM {database}.{USAGE_EVENTS}{LOCAL_SUFFIX}").result_rows
        assert local == [(20,)]
    finally:
        ch.close()
