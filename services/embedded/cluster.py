"""A JetStream cluster of nats-server processes on one machine (`frugalmesh up --cluster 3`, the chaos tests).

Each node is an ``EmbeddedNats`` with its own client port, route port, monitoring port, store
folder and server name, and a route to every other node; together they elect a JetStream meta
leader, and each stream the mesh declares with ``FRUGALMESH_REPLICAS=3`` keeps a copy on each
node. deploy/nats/ holds the same configuration for three hosts.

Durability (issue 17, Jepsen's NATS 2.12.1 analysis, nats-server #7564): a replicated write is
acknowledged once a quorum holds it, by default only in the page cache, flushed every two minutes,
so a power loss of two hosts can lose an acknowledged write. The nodes here fsync every write
(``sync_interval: always``); what that costs the ledger is measured in docs/benchmarks.md
("Journal durability"). A cluster of three survives one node lost; it refuses writes (and the mesh
refuses paid calls) while two are.

Ports are picked free when the cluster starts and kept, so a node killed and started again comes
back on the same addresses, where its peers' routes look for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.embedded.servers import EmbeddedError, EmbeddedNats, free_port

CLUSTER_NAME = "frugalmesh"
START_ATTEMPTS = 3

NODE_CONFIG = """server_name: {name}
http: {host}:{monitor_port}
jetstream {{
  sync_interval: {sync_interval}
}}
cluster {{
  name: {cluster}
  listen: {host}:{route_port}
  routes: [
    {routes}
  ]
}}
"""


@dataclass
class ClusterNode:
    name: str
    client_port: int
    route_port: int
    monitor_port: int
    server: EmbeddedNats

    @property
    def health_url(self) -> str:
        return f"http://{self.server.host}:{self.monitor_port}/healthz"


@dataclass
class EmbeddedNatsCluster:
    """``size`` nats-server nodes routed to each other, storing under ``data_dir/<name>``.

    ``port``: the first node's client port (the others follow it); 0 picks free ports.
    ``sync_interval``: how often each node fsyncs JetStream writes (``always``: every write)."""

    data_dir: Path
    size: int = 3
    port: int = 0
    host: str = "127.0.0.1"
    sync_interval: str = "always"
    # The identities' authorization block every node includes (services/embedded/creds.py); None: open.
    auth_file: Path | None = None
    nodes: list[ClusterNode] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what NATS_URL takes."""
        return ",".join(f"nats://{self.host}:{node.client_port}" for node in self.nodes)

    def start(self, timeout_s: float = 60.0) -> str:
        """Start every node and wait until the cluster has a JetStream leader; returns ``url``.

        A port found free can be taken by another process before its node binds it: the nodes are
        then started again on other ports, up to ``START_ATTEMPTS`` times."""
        if self.size < 1:
            raise EmbeddedError(f"a cluster needs at least one node, not {self.size}")
        for attempt in range(START_ATTEMPTS):
            try:
                self._start_nodes(timeout_s)
                break
            except EmbeddedError:
                self.stop()
                self.nodes = []
                if attempt == START_ATTEMPTS - 1:
                    raise
        self.wait_healthy(timeout_s)
        return self.url

    def _start_nodes(self, timeout_s: float) -> None:
        route_ports = [free_port(self.host) for _ in range(self.size)]
        for index in range(self.size):
            name = f"n{index + 1}"
            routes = ",\n    ".join(f"nats://{self.host}:{p}" for i, p in enumerate(route_ports) if i != index)
            monitor_port = free_port(self.host)
            config = NODE_CONFIG.format(
                name=name,
                host=self.host,
                monitor_port=monitor_port,
                sync_interval=self.sync_interval,
                cluster=CLUSTER_NAME,
                route_port=route_ports[index],
                routes=routes,
            )
            client_port = self.port + index if self.port else free_port(self.host)
            server = EmbeddedNats(
                self.data_dir / name, port=client_port, host=self.host, config=config, auth_file=self.auth_file
            )
            self.nodes.append(ClusterNode(name, client_port, route_ports[index], monitor_port, server))
        for node in self.nodes:
            node.server.start(timeout_s)

    def wait_healthy(self, timeout_s: float = 60.0, nodes: list[int] | None = None) -> None:
        """Wait until each node (``nodes``: those indices) reports JetStream current (``/healthz``): the
        meta leader is elected and the node has caught up with it."""
        deadline = time.monotonic() + timeout_s
        for index in range(self.size) if nodes is None else nodes:
            node = self.nodes[index]
            while not self._healthy(node):
                process = node.server.process
                if process is not None and process.poll() is not None:
                    raise EmbeddedError(f"nats-server {node.name} exited with code {process.returncode}")
                if time.monotonic() > deadline:
                    raise EmbeddedError(f"nats-server {node.name} not healthy in {timeout_s:.0f}s ({node.health_url})")
                time.sleep(0.1)

    @staticmethod
    def _healthy(node: ClusterNode) -> bool:
        try:
            return httpx.get(node.health_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``."""
        self.nodes[index].server.kill()

    def restart(self, index: int, timeout_s: float = 60.0) -> None:
        """Start node ``index`` again on its own ports and store, and wait until it has caught up."""
        self.nodes[index].server.start(timeout_s)
        self.wait_healthy(timeout_s, [index])

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()
