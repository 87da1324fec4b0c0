"""The one-machine stack behind `frugalmesh up` and `frugalmesh demo`.

Starts nats-server and the embedded ClickHouse (unless NATS_URL / CLICKHOUSE_URL name running
ones), the local model engine (unless FRUGALMESH_LOCAL_ENGINE_URL names one), the seven services
and the shipped agents (one instance each, as `frugalmesh agent run` starts it) as separate
processes, each logging to ``<home>/logs/``. The URLs of a running stack (the gateway's included:
its ready file says where it listens) are written to ``<home>/stack.json`` (0600: it holds the
ClickHouse passwords) so other commands find it. ``development_key`` gives `up` a gateway key when
there is none. Only the accountant's process gets the ClickHouse writer's URL.

NATS identities (services/runtime/identities.py) are on whenever the stack starts its own nats-server:
each process gets its own credential (``FRUGALMESH_NATS_CREDS``), and the operator who runs `up` one
in their login name, which stack.json names so the other commands use it; the server lets nobody else
in. With NATS_URL naming a running server, every process uses the environment's credential, if any.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from services.embedded.cluster import EmbeddedNatsCluster
from services.embedded.creds import OPERATOR, CredentialStore
from services.embedded.servers import (
    EmbeddedClickHouse,
    EmbeddedEngine,
    EmbeddedError,
    EmbeddedNats,
    LocalEngineKind,
    stop_process,
    write_private,
)
from services.registry import SERVICES
from services.runtime.catalog import Catalog
from services.runtime.grants import key_environments
from services.runtime.settings import MeshSettings

STATE_FILE = "stack.json"
CREDS_ENV = ("NATS_CREDS", "FRUGALMESH_NATS_CREDS")
WRITER_ENV = ("CLICKHOUSE_URL", "FRUGALMESH_CLICKHOUSE_URL")
ANALYST_ENV = ("CLICKHOUSE_ANALYST_URL", "FRUGALMESH_CLICKHOUSE_ANALYST_URL")
# The only service that talks to ClickHouse (as the writer).
CLICKHOUSE_CLIENTS = ("accountant",)


def provider_key_names(catalog: Catalog) -> dict[str, set[str]]:
    """Per inference service (``local-inference``, ``cloud-inference``), the environment variables
    holding the API keys of the providers its models are served by."""
    keys: dict[str, set[str]] = {"local-inference": set(), "cloud-inference": set()}
    for model in catalog.models.values():
        provider = catalog.providers[model.provider]
        if provider.api_key_env:
            keys[f"{model.service}-inference"].add(provider.api_key_env)
    return keys


# The agents a stack runs, by the process name it lists them under: the shipped workflows use them.
SHIPPED_AGENTS = {"agent-debate": "frugalmesh.agents.shipped.debate:agent"}


def running_stack(home: Path) -> dict | None:
    """The URLs of a stack started by `frugalmesh up` that is still alive, else None."""
    path = home / STATE_FILE
    try:
        state = json.loads(path.read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def _in_env(names: tuple[str, ...]) -> bool:
    return any(os.environ.get(name) for name in names)


def write_state(home: Path, state: dict) -> None:
    """``<home>/stack.json``, readable by the owner only (it holds the ClickHouse passwords)."""
    write_private(home / STATE_FILE, json.dumps(state))


def client_settings(home: Path | None = None) -> MeshSettings:
    """Settings for a client command: the environment wins, then a running `up` stack. The stack's
    analyst goes with the stack's writer: not when CLICKHOUSE_URL names another server."""
    settings = MeshSettings()
    state = running_stack(home or settings.home)
    update = {}
    if state and not os.environ.get("NATS_URL") and not os.environ.get("FRUGALMESH_NATS_URL"):
        update["nats_url"] = state["nats_url"]
        if state.get("nats_creds") and not _in_env(CREDS_ENV):
            update["nats_creds"] = Path(state["nats_creds"])
    if state and not _in_env(WRITER_ENV):
        update["clickhouse_url"] = state["clickhouse_url"]
        if state.get("clickhouse_analyst_url") and not _in_env(ANALYST_ENV):
            update["clickhouse_analyst_url"] = state["clickhouse_analyst_url"]
    if state and state.get("replicas") and not os.environ.get("FRUGALMESH_REPLICAS"):
        update["replicas"] = state["replicas"]
    if state and state.get("local_engine_url") and not os.environ.get("FRUGALMESH_LOCAL_ENGINE_URL"):
        update["local_engine_url"] = state["local_engine_url"]
    return settings.model_copy(update=update) if update else settings


class NoWriter(EmbeddedError):
    """A write was asked for where the writer's credentials are not known."""


@dataclass(frozen=True)
class QueryTarget:
    """Where `frugalmesh sql` sends a query (``url``, with the analyst's or the writer's credentials);
    ``readonly``: the query must run with readonly=1 (the writer's credentials standing in for an
    analyst that is not configured: ClickHouse then refuses any change)."""

    url: str
    readonly: bool = False


def _target(writer_url: str, analyst_url: str, write: bool) -> QueryTarget:
    if write:
        return QueryTarget(writer_url)
    if analyst_url:
        return QueryTarget(analyst_url)
    return QueryTarget(writer_url, readonly=True)


@contextmanager
def clickhouse_for_queries(settings: MeshSettings, write: bool = False) -> Iterator[QueryTarget]:
    """Where to query ClickHouse: as the read-only analyst, or as the writer when ``write``. The
    configured or running servers; with neither, the embedded server is started on the data a stopped
    stack left in ``home`` (so rows stay queryable). Raises NoWriter when ``write`` and the writer's
    credentials are not known (no CLICKHOUSE_URL, no stack)."""
    configured = _in_env(WRITER_ENV) or _in_env(ANALYST_ENV) or running_stack(settings.home)
    stored = settings.home / "clickhouse"
    if configured or not (stored / "data").is_dir():
        if write and not (_in_env(WRITER_ENV) or running_stack(settings.home)):
            raise NoWriter(
                "writing needs the writer's credentials: set CLICKHOUSE_URL "
                "(http://writer:PASSWORD@HOST:8123/frugalmesh), or run this where `frugalmesh up` runs"
            )
        yield _target(settings.clickhouse_url, settings.clickhouse_analyst_url, write)
        return
    server = EmbeddedClickHouse(stored, port=0)
    try:
        writer_url = server.start()
        yield _target(writer_url, server.analyst_url, write)
    finally:
        server.stop()


def development_key(settings: MeshSettings) -> str | None:
    """When the stack's NATS holds no gateway key at all, create one for tenant ``default`` and
    return its secret (shown once, so `up` prints it); None when keys exist."""
    from services.gateway.keys import KeyStore
    from services.runtime.bus import Bus

    async def ensure() -> str | None:
        bus = Bus(settings, "stack", reconnect_attempts=3)
        await bus.connect()
        try:
            store = await KeyStore.open(bus)
            if await store.list():
                return None
            secret, _ = await store.create("default", name="development", by=getpass.getuser())
            return secret
        finally:
            await bus.close()

    return asyncio.run(ensure())


def declare_streams(settings: MeshSettings) -> None:
    """Create the mesh's streams once, before the services start: on a new cluster, seven processes
    creating replicated streams at once can keep the JetStream API busier than a client waits."""
    from services.runtime.bus import Bus

    async def declare() -> None:
        bus = Bus(settings, "stack", reconnect_attempts=3)
        await bus.connect()
        try:
            await bus.declare_streams()
        finally:
            await bus.close()

    asyncio.run(declare())


@dataclass
class Stack:
    home: Path
    nats_port: int = 4222
    clickhouse_port: int = 8123
    settings: MeshSettings = field(default_factory=MeshSettings)
    # The local engine to start (None: none, e.g. for load tests on the synthetic backend) and
    # what it serves ("": the embedded engine's SmolLM2; vllm needs a model id or path).
    local_engine: LocalEngineKind | None = "cpu"
    local_model: str = ""
    # The gateway's HTTP port; 0 picks a free one (`up` passes the configured port).
    gateway_port: int = 0
    # The agents to run beside the services, one instance each: process name -> module:attribute.
    agents: dict[str, str] = field(default_factory=lambda: dict(SHIPPED_AGENTS))
    # Nodes of the JetStream cluster to start in place of one nats-server (0: one server); every
    # stream and bucket then keeps min(nodes, 3) copies.
    nats_cluster: int = 0
    gateway_url: str = field(default="", init=False)
    nats: EmbeddedNats | None = field(default=None, init=False)
    cluster: EmbeddedNatsCluster | None = field(default=None, init=False)
    clickhouse: EmbeddedClickHouse | None = field(default=None, init=False)
    engine: EmbeddedEngine | None = field(default=None, init=False)
    services: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    # Each process's seed file, when the stack runs its own nats-server (identities on).
    creds: dict[str, Path] = field(default_factory=dict, init=False)

    def start(self, timeout_s: float = 60.0) -> MeshSettings:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        nats_url = os.environ.get("NATS_URL")
        replicas = self.settings.replicas
        auth_file = None if nats_url else self.write_identities()
        if not nats_url and self.nats_cluster:
            first_port = max(self.nats_port, 0)  # -1 (a free port) is 0 here: free ports for every node
            self.cluster = EmbeddedNatsCluster(
                self.home / "nats-cluster", size=self.nats_cluster, port=first_port, auth_file=auth_file
            )
            nats_url = self.cluster.start()
            replicas = min(self.nats_cluster, 3)
        elif not nats_url:
            self.nats = EmbeddedNats(self.home / "nats", port=self.nats_port, auth_file=auth_file)
            nats_url = self.nats.start()
        clickhouse_url = os.environ.get("CLICKHOUSE_URL")
        analyst_url = self.settings.clickhouse_analyst_url
        if not clickhouse_url:
            self.clickhouse = EmbeddedClickHouse(self.home / "clickhouse", port=self.clickhouse_port)
            clickhouse_url = self.clickhouse.start()
            analyst_url = self.clickhouse.analyst_url
        update: dict[str, str | Path] = {
            "nats_url": nats_url,
            "clickhouse_url": clickhouse_url,
            "clickhouse_analyst_url": analyst_url,
        }
        if self.local_engine and not self.settings.local_engine_url:
            self.engine = EmbeddedEngine(self.home / "logs", kind=self.local_engine, model=self.local_model)
            update["local_engine_url"] = self.engine.start()
        if self.creds:
            # The stack's own commands (streams, the development key) and the CLI run as the operator.
            update["nats_creds"] = self.creds[OPERATOR]
        self.settings = self.settings.model_copy(update={**update, "replicas": replicas})
        if self.cluster:
            # The protected streams are the accountant's to declare.
            accountant = self.creds.get("accountant")
            declare_streams(
                self.settings.model_copy(update={"nats_creds": accountant}) if accountant else self.settings
            )
        self._start_services(timeout_s)
        state = {
            "pid": os.getpid(),
            **{key: str(value) for key, value in update.items()},
            "replicas": replicas,
            "gateway_url": self.gateway_url,
            "nats_pids": [server.process.pid for server in self._nats_servers() if server.process],
        }
        write_state(self.home, state)
        return self.settings

    def write_identities(self) -> Path:
        """A credential for each process and for the operator running the stack; the server's auth file."""
        store = CredentialStore(self.home)
        self.creds = store.ensure_mesh([*SERVICES, *self.agents])
        return store.write_auth(self.settings.subjects, self.home)

    def _nats_servers(self) -> list[EmbeddedNats]:
        return [self.nats] if self.nats else [node.server for node in self.cluster.nodes] if self.cluster else []

    def process_environments(self) -> dict[str, dict[str, str]]:
        """Each process's environment (services by name, agents as ``agent-<name>``): what every one gets,
        and the secrets only where they are used."""
        env = {
            **{name: value for name, value in os.environ.items() if name not in WRITER_ENV + ANALYST_ENV},
            "NATS_URL": self.settings.nats_url,
            "FRUGALMESH_REPLICAS": str(self.settings.replicas),
            "FRUGALMESH_SUBJECT_PREFIX": self.settings.subject_prefix,
            "FRUGALMESH_DEPLOY_DIR": str(self.settings.deploy_dir.resolve()),
            "FRUGALMESH_HOME": str(self.home),
            "FRUGALMESH_LOCAL_ENGINE_URL": self.settings.local_engine_url,
            "FRUGALMESH_GATEWAY_HOST": self.settings.gateway_host,
            "FRUGALMESH_GATEWAY_PORT": str(self.gateway_port),
        }
        if self.settings.data:
            env["FRUGALMESH_DATA"] = str(self.settings.data)
        # Grants: every process may verify with the accountant's public key; only the accountant
        # learns where its seed is (services/runtime/grants.py).
        every, accountant_only = key_environments(self.home)
        env.update(every)
        provider_keys = provider_key_names(Catalog.load(self.settings.deploy_dir))
        environments = {}
        for name in [*SERVICES, *self.agents]:
            # The writer's URL only where it is used; no process gets the analyst's.
            own_env = {**env, "CLICKHOUSE_URL": self.settings.clickhouse_url} if name in CLICKHOUSE_CLIENTS else env
            if name == "accountant":
                own_env = {**own_env, **accountant_only}
            # A provider's API key only in the inference service that calls that provider.
            withheld = set().union(*provider_keys.values()) - provider_keys.get(name, set())
            own_env = {key: value for key, value in own_env.items() if key not in withheld}
            if self.creds:  # its own NATS identity, no other
                own_env = {key: value for key, value in own_env.items() if key not in CREDS_ENV}
                own_env["FRUGALMESH_NATS_CREDS"] = str(self.creds[name])
            environments[name] = own_env
        return environments

    def _start_services(self, timeout_s: float) -> None:
        logs = self.home / "logs"
        run_dir = self.home / "run"
        logs.mkdir(exist_ok=True)
        run_dir.mkdir(exist_ok=True)
        # The accountant first: it creates the buckets only it may (the control bucket every service reads).
        commands = {name: ["run", name] for name in sorted(SERVICES, key=lambda name: name != "accountant")}
        commands.update({name: ["agent", "run", target] for name, target in self.agents.items()})
        environments = self.process_environments()
        ready_files = {}
        for name, command in commands.items():
            ready = run_dir / f"{name}.ready"
            ready.unlink(missing_ok=True)
            ready_files[name] = ready
            own_env = environments[name]
            with (logs / f"{name}.log").open("ab") as log:
                self.services[name] = subprocess.Popen(
                    [sys.executable, "-m", "services.cli.main", *command, "--ready-file", str(ready)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=own_env,
                )
            if self.cluster:
                # One at a time: on a new cluster, seven processes creating replicated buckets at once
                # can keep the JetStream API busier than a client waits.
                self._wait_ready(name, ready, time.monotonic() + timeout_s)
        deadline = time.monotonic() + timeout_s
        for name, ready in ready_files.items():
            self._wait_ready(name, ready, deadline)
        if "gateway" in ready_files:
            self.gateway_url = ready_files["gateway"].read_text().strip()

    def _wait_ready(self, name: str, ready: Path, deadline: float) -> None:
        logs = self.home / "logs"
        while not ready.exists():
            process = self.services[name]
            if process.poll() is not None:
                raise EmbeddedError(f"service {name} exited with code {process.returncode}; see {logs / name}.log")
            if time.monotonic() > deadline:
                raise EmbeddedError(f"service {name} not ready in time; see {logs / name}.log")
            time.sleep(0.05)

    def dead_services(self) -> list[str]:
        return [name for name, process in self.services.items() if process.poll() is not None]

    def stop(self) -> None:
        for process in self.services.values():
            if process.poll() is None:
                process.terminate()
        for process in self.services.values():
            stop_process(process)
        if self.engine:
            self.engine.stop()
        if self.clickhouse:
            self.clickhouse.stop()
        if self.nats:
            self.nats.stop()
        if self.cluster:
            self.cluster.stop()
        (self.home / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
