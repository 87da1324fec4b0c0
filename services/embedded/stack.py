"""The one-machine stack behind `frugalmesh up` and `frugalmesh demo`.

Starts nats-server and the embedded ClickHouse (unless NATS_URL / CLICKHOUSE_URL name running
ones), the local model engine (unless FRUGALMESH_LOCAL_ENGINE_URL names one), the seven services
and the shipped agents (one instance each, as `frugalmesh agent run` starts it) as separate
processes, each logging to ``<home>/logs/``. The URLs of a running stack (the gateway's included:
its ready file says where it listens) are written to ``<home>/stack.json`` so other commands
find it. ``development_key`` gives `up` a gateway key when there is none.
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

from services.embedded.servers import (
    EmbeddedClickHouse,
    EmbeddedEngine,
    EmbeddedError,
    EmbeddedNats,
    LocalEngineKind,
    stop_process,
)
from services.registry import SERVICES
from services.runtime.settings import MeshSettings

STATE_FILE = "stack.json"
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


def client_settings(home: Path | None = None) -> MeshSettings:
    """Settings for a client command: the environment wins, then a running `up` stack."""
    settings = MeshSettings()
    state = running_stack(home or settings.home)
    update = {}
    if state and not os.environ.get("NATS_URL") and not os.environ.get("FRUGALMESH_NATS_URL"):
        update["nats_url"] = state["nats_url"]
    if state and not os.environ.get("CLICKHOUSE_URL") and not os.environ.get("FRUGALMESH_CLICKHOUSE_URL"):
        update["clickhouse_url"] = state["clickhouse_url"]
    if state and state.get("local_engine_url") and not os.environ.get("FRUGALMESH_LOCAL_ENGINE_URL"):
        update["local_engine_url"] = state["local_engine_url"]
    return settings.model_copy(update=update) if update else settings


@contextmanager
def clickhouse_for_queries(settings: MeshSettings) -> Iterator[str]:
    """The ClickHouse URL to query: the configured or running one; with neither, the embedded
    server is started on the data a stopped stack left in ``home`` (so rows stay queryable)."""
    configured = os.environ.get("CLICKHOUSE_URL") or os.environ.get("FRUGALMESH_CLICKHOUSE_URL")
    stored = settings.home / "clickhouse"
    if configured or running_stack(settings.home) or not (stored / "data").is_dir():
        yield settings.clickhouse_url
        return
    server = EmbeddedClickHouse(stored, port=0)
    try:
        yield server.start()
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
    gateway_url: str = field(default="", init=False)
    nats: EmbeddedNats | None = field(default=None, init=False)
    clickhouse: EmbeddedClickHouse | None = field(default=None, init=False)
    engine: EmbeddedEngine | None = field(default=None, init=False)
    services: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    def start(self, timeout_s: float = 60.0) -> MeshSettings:
        self.home.mkdir(parents=True, exist_ok=True)
        nats_url = os.environ.get("NATS_URL")
        if not nats_url:
            self.nats = EmbeddedNats(self.home / "nats", port=self.nats_port)
            nats_url = self.nats.start()
        clickhouse_url = os.environ.get("CLICKHOUSE_URL")
        if not clickhouse_url:
            self.clickhouse = EmbeddedClickHouse(self.home / "clickhouse", port=self.clickhouse_port)
            clickhouse_url = self.clickhouse.start()
        update = {"nats_url": nats_url, "clickhouse_url": clickhouse_url}
        if self.local_engine and not self.settings.local_engine_url:
            self.engine = EmbeddedEngine(self.home / "logs", kind=self.local_engine, model=self.local_model)
            update["local_engine_url"] = self.engine.start()
        self.settings = self.settings.model_copy(update=update)
        self._start_services(timeout_s)
        state = {"pid": os.getpid(), **update, "gateway_url": self.gateway_url}
        (self.home / STATE_FILE).write_text(json.dumps(state))
        return self.settings

    def _start_services(self, timeout_s: float) -> None:
        logs = self.home / "logs"
        run_dir = self.home / "run"
        logs.mkdir(exist_ok=True)
        run_dir.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "NATS_URL": self.settings.nats_url,
            "CLICKHOUSE_URL": self.settings.clickhouse_url,
            "FRUGALMESH_SUBJECT_PREFIX": self.settings.subject_prefix,
            "FRUGALMESH_LOCAL_ENGINE_URL": self.settings.local_engine_url,
            "FRUGALMESH_GATEWAY_HOST": self.settings.gateway_host,
            "FRUGALMESH_GATEWAY_PORT": str(self.gateway_port),
        }
        if self.settings.data:
            env["FRUGALMESH_DATA"] = str(self.settings.data)
        commands = {name: ["run", name] for name in SERVICES}
        commands.update({name: ["agent", "run", target] for name, target in self.agents.items()})
        ready_files = {}
        for name, command in commands.items():
            ready = run_dir / f"{name}.ready"
            ready.unlink(missing_ok=True)
            ready_files[name] = ready
            with (logs / f"{name}.log").open("ab") as log:
                self.services[name] = subprocess.Popen(
                    [sys.executable, "-m", "services.cli.main", *command, "--ready-file", str(ready)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
        deadline = time.monotonic() + timeout_s
        for name, ready in ready_files.items():
            while not ready.exists():
                process = self.services[name]
                if process.poll() is not None:
                    raise EmbeddedError(f"service {name} exited with code {process.returncode}; see {logs / name}.log")
                if time.monotonic() > deadline:
                    raise EmbeddedError(f"service {name} not ready after {timeout_s:.0f}s; see {logs / name}.log")
                time.sleep(0.05)
        if "gateway" in ready_files:
            self.gateway_url = ready_files["gateway"].read_text().strip()

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
