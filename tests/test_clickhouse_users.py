"""ClickHouse's users, as built (services/embedded/servers.py; compose: deploy/clickhouse/users.d/):
`writer`, the accountant's user, writes but never drops a database, manages users, runs SYSTEM
statements or reads files; `analyst`, what `frugalmesh sql` runs as, reads and changes nothing; a
login without a password reaches no data; the files that hold the passwords are the owner's alone.

The embedded server keeps one user without a password, `default`: chdb's own in-process session logs
in as `default` with an empty password (chdb-core hard-codes it and never reloads users), so it
cannot have one. It is granted only SYSTEM LISTEN (the session opens the HTTP listener with it), and a
request naming no user is refused; the tests below show such a login reads, writes and creates nothing.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
import httpx
import pytest
from click.testing import CliRunner
from clickhouse_connect.driver.exceptions import DatabaseError

from services.accountant.clickhouse import create_schema
from services.cli.main import cli
from services.embedded.servers import ANALYST_GRANTS, WRITER_GRANTS, EmbeddedClickHouse, password
from services.embedded.stack import STATE_FILE, running_stack, write_state

REPO = Path(__file__).resolve().parents[1]
USERS_D = REPO / "deploy" / "clickhouse" / "users.d"
REFUSED = ("(ACCESS_DENIED)", "(READONLY)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def refused(client, statement: str) -> str:
    """ClickHouse's refusal of ``statement`` (an access or readonly error, never another failure)."""
    with pytest.raises(DatabaseError) as error:
        client.command(statement)
    message = str(error.value)
    assert any(code in message for code in REFUSED), message
    return message


@pytest.fixture
def database(ch, settings) -> str:
    """This test's own database with the accountant's schema and one usage row, made by the writer."""
    database = settings.subject_prefix
    create_schema(ch, database)
    ch.command(f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('first', now())")
    return database


@pytest.fixture
def analyst(clickhouse_analyst_url):
    client = clickhouse_connect.get_client(dsn=clickhouse_analyst_url)
    yield client
    client.close()


def cli_env(home: Path, writer: str | None, analyst: str | None) -> dict[str, str | None]:
    """The environment of a `frugalmesh` command run by hand (None unsets a variable)."""
    return {
        "FRUGALMESH_HOME": str(home),
        "CLICKHOUSE_URL": writer,
        "CLICKHOUSE_ANALYST_URL": analyst,
        "FRUGALMESH_CLICKHOUSE_URL": None,
        "FRUGALMESH_CLICKHOUSE_ANALYST_URL": None,
    }


# -- who may do what, refused by ClickHouse itself --


@pytest.mark.infra
def test_no_login_without_a_password_reaches_any_data(clickhouse_url, database):
    """No user, or `default` named any way HTTP allows (Basic auth, X-ClickHouse-User, URL
    parameters) with no password: nothing to read, write, create or load from a file."""
    base = f"http://{urlsplit(clickhouse_url).netloc.rsplit('@', 1)[1]}/"
    anonymous = httpx.post(base, content="SELECT 1", timeout=10)
    assert anonymous.status_code != 200, anonymous.text
    logins = {
        "basic": {"auth": ("default", "")},
        "header": {"headers": {"X-ClickHouse-User": "default"}},
        "parameter": {"params": {"user": "default"}},
    }
    statements = [
        f"SELECT count() FROM {database}.usage_events",
        f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('nobody', now())",
        f"CREATE DATABASE nobody_{uuid.uuid4().hex[:8]}",
        f"DROP TABLE {database}.usage_events",
        "SELECT * FROM file('/etc/hostname', 'RawBLOB')",
        "SELECT name FROM system.users",
    ]
    for how, login in logins.items():
        for statement in statements:
            reply = httpx.post(base, content=statement, timeout=10, **login)
            assert reply.status_code != 200, (how, statement, reply.text)
        # It does not even see that a database exists.
        shown = httpx.post(base, content="SHOW DATABASES", timeout=10, **login)
        assert shown.status_code != 200 or shown.text.strip() == "", (how, shown.text)
    assert httpx.post(base, content=statements[0], auth=("writer", "wrong"), timeout=10).status_code != 200


@pytest.mark.infra
def test_the_analyst_reads_usage_events_and_changes_nothing(analyst, ch, database):
    assert analyst.query(f"SELECT count() FROM {database}.usage_events").result_rows == [(1,)]
    assert analyst.query(f"SELECT count() FROM {database}.spend_daily").result_rows  # the views too
    for statement in (
        f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('analyst', now())",
        f"ALTER TABLE {database}.usage_events ADD COLUMN extra String",
        f"ALTER TABLE {database}.usage_events DELETE WHERE 1",
        f"DROP TABLE {database}.usage_events",
        f"TRUNCATE TABLE {database}.usage_events",
        f"DROP DATABASE {database}",
        f"CREATE DATABASE analyst_{uuid.uuid4().hex[:8]}",
        f"CREATE TABLE {database}.mine (x Int32) ENGINE = MergeTree ORDER BY x",
        "SELECT * FROM file('/etc/hostname', 'RawBLOB')",
        "SYSTEM STOP LISTEN HTTP",
    ):
        refused(analyst, statement)
    assert ch.query(f"SELECT event_id FROM {database}.usage_events").result_rows == [("first",)]


@pytest.mark.infra
def test_the_analyst_cannot_lift_its_own_readonly(clickhouse_analyst_url, database):
    parts = urlsplit(clickhouse_analyst_url)
    base = f"http://{parts.hostname}:{parts.port}/"
    reply = httpx.post(
        base,
        params={"readonly": "0"},
        content=f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('lifted', now())",
        auth=(parts.username or "", parts.password or ""),
        timeout=10,
    )
    assert reply.status_code != 200 and "READONLY" in reply.text, reply.text


@pytest.mark.infra
def test_the_writer_writes_but_drops_no_database_and_manages_no_user(ch, database):
    """What the accountant needs (create, insert, add a column, read) and nothing above it."""
    ch.command(f"INSERT INTO {database}.usage_events (event_id, time) VALUES ('second', now())")
    ch.command(f"ALTER TABLE {database}.usage_events ADD COLUMN IF NOT EXISTS extra String DEFAULT ''")
    assert ch.query(f"SELECT count() FROM {database}.usage_events").result_rows == [(2,)]
    for statement in (
        f"DROP DATABASE {database}",
        "CREATE USER intruder IDENTIFIED BY 'x'",
        "ALTER USER analyst IDENTIFIED BY 'x'",
        "GRANT ALL ON *.* TO analyst",
        "SELECT * FROM file('/etc/hostname', 'RawBLOB')",
        f"INSERT INTO FUNCTION file('{uuid.uuid4().hex}.csv', 'CSV', 'x String') VALUES ('x')",
        "SYSTEM STOP LISTEN HTTP",
        f"CREATE TABLE {database}.files (x String) ENGINE = File(CSV)",
    ):
        refused(ch, statement)


# -- frugalmesh sql: the analyst by default, the writer only when asked --


@pytest.mark.infra
def test_sql_refuses_a_change_as_the_analyst_and_makes_it_with_write(
    clickhouse_url, clickhouse_analyst_url, database, ch, tmp_path
):
    env = cli_env(tmp_path, clickhouse_url, clickhouse_analyst_url)
    runner = CliRunner()
    select = runner.invoke(cli, ["sql", f"SELECT event_id FROM {database}.usage_events", "--format", "tsv"], env=env)
    assert select.exit_code == 0, select.output
    assert select.stdout.splitlines() == ["event_id", "first"]

    drop = runner.invoke(cli, ["sql", f"DROP TABLE {database}.kill_events"], env=env)
    assert drop.exit_code == 1, drop.output
    assert "analyst" in drop.output and "--write" in drop.output
    assert "kill_events" in {row[0] for row in ch.query(f"SHOW TABLES FROM {database}").result_rows}

    dropped = runner.invoke(cli, ["sql", "--write", f"DROP TABLE {database}.kill_events"], env=env)
    assert dropped.exit_code == 0, dropped.output
    assert "kill_events" not in {row[0] for row in ch.query(f"SHOW TABLES FROM {database}").result_rows}


@pytest.mark.infra
def test_sql_without_an_analyst_reads_as_the_writer_in_a_readonly_session(clickhouse_url, database, tmp_path):
    env = cli_env(tmp_path, clickhouse_url, None)
    runner = CliRunner()
    select = runner.invoke(cli, ["sql", f"SELECT count() FROM {database}.usage_events", "--format", "tsv"], env=env)
    assert select.exit_code == 0, select.output
    assert select.stdout.splitlines()[1:] == ["1"]
    drop = runner.invoke(cli, ["sql", f"DROP TABLE {database}.usage_events"], env=env)
    assert drop.exit_code == 1 and "READONLY" in drop.output and "--write" in drop.output, drop.output


@pytest.mark.unit
def test_sql_write_without_the_writers_credentials_says_so(tmp_path):
    """Only the analyst's URL known, no stack: --write stops before connecting anywhere."""
    env = cli_env(tmp_path, None, "http://analyst:secret@127.0.0.1:9/frugalmesh")
    result = CliRunner().invoke(cli, ["sql", "--write", "DROP TABLE usage_events"], env=env)
    assert result.exit_code == 1, result.output
    assert "writer's credentials" in result.output and "CLICKHOUSE_URL" in result.output


# -- where the passwords live --


@pytest.mark.infra
def test_the_password_files_are_the_owners_alone(tmp_path):
    """The embedded server's own folder, whichever backend the session's servers come from."""
    server = EmbeddedClickHouse(tmp_path / "clickhouse", port=0)
    server.start()
    try:
        folder = server.data_dir
        assert mode(folder) == 0o700
        for user, url in (("writer", server.url), ("analyst", server.analyst_url)):
            path = folder / f"{user}.password"
            assert mode(path) == 0o600, path
            assert urlsplit(url).password == path.read_text().strip()
        assert mode(folder / "conf" / "users.xml") == 0o600
        assert not (folder / "mesh.password").exists()
        assert not any(urlsplit(url).password in (folder / "conf" / "users.xml").read_text()
                       for url in (server.url, server.analyst_url))  # fmt: skip
    finally:
        server.stop()


@pytest.mark.unit
def test_a_password_is_made_once_owner_only_and_an_old_file_is_closed(tmp_path):
    path = tmp_path / "writer.password"
    made = password(path)
    assert len(made) >= 32 and mode(path) == 0o600
    assert password(path) == made
    path.chmod(0o644)
    assert password(path) == made and mode(path) == 0o600
    assert password(tmp_path / "analyst.password") != made


@pytest.mark.unit
def test_stack_json_is_the_owners_alone(tmp_path):
    (tmp_path / STATE_FILE).write_text("{}")
    (tmp_path / STATE_FILE).chmod(0o644)
    state = {"pid": os.getpid(), "clickhouse_url": "http://writer:secret@127.0.0.1:1/frugalmesh"}
    write_state(tmp_path, state)
    assert mode(tmp_path / STATE_FILE) == 0o600
    assert running_stack(tmp_path) == state == json.loads((tmp_path / STATE_FILE).read_text())


# -- compose's users are the embedded server's --


def grants(user: ET.Element) -> tuple[str, ...]:
    return tuple(" ".join((query.text or "").split()) for query in user.iterfind("grants/query"))


@pytest.mark.unit
def test_compose_users_have_the_embedded_servers_rights():
    users_file = ET.parse(USERS_D / "frugalmesh.xml").getroot()
    writer, analyst = users_file.find("users/writer"), users_file.find("users/analyst")
    assert writer is not None and analyst is not None
    assert grants(writer) == WRITER_GRANTS and grants(analyst) == ANALYST_GRANTS
    assert analyst.findtext("profile") == "analyst"
    assert users_file.findtext("profiles/analyst/readonly") == "1"
    for user, variable in ((writer, "CLICKHOUSE_WRITER_PASSWORD"), (analyst, "CLICKHOUSE_ANALYST_PASSWORD")):
        element = user.find("password")
        assert element is not None and element.get("from_env") == variable and not (element.text or "").strip()
        assert user.findtext("access_management") in (None, "0")
    removed = ET.parse(USERS_D / "no-default.xml").getroot().find("users/default")
    assert removed is not None and removed.get("remove") == "remove"
