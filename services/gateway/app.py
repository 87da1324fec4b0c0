"""gateway: the mesh's OpenAI-compatible HTTP door (``frugalmesh run gateway``).

A FastStream app like every service, so ``run``, ``up`` and the tests start it the same way; its
start-up reads every virtual key (then follows them: services/gateway/keys.py), binds the HTTP
socket itself (a taken port fails the start with the address, and port 0 gets a free one, whose
URL ``listening`` receives) and serves it with uvicorn (Starlette routes: routes.py) on the same
event loop as the bus. Signals stay FastStream's: it stops the HTTP server on shutdown.

Stateless: every request is one step through the router, so more replicas are more processes
(on other ports, or behind any HTTP load balancer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator

import uvicorn
from faststream import FastStream

from services.gateway.antiloop import GatewayTasks
from services.gateway.keys import KeyCache
from services.gateway.recording import GatewayRecorder
from services.gateway.routes import Gateway, create_http_app
from services.runtime.bus import Bus
from services.runtime.catalog import Catalog
from services.runtime.settings import MeshSettings
from services.runtime.task_limits import TaskLimits

SERVICE = "gateway"
STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 5


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the FastStream app owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) on accepted connections only when the
    # listener says TCP, and with Nagle on a response's body waited 40 ms for the client's delayed ACK
    # (docs/benchmarks.md, the LiteLLM section).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"gateway cannot listen on {host}:{port}: {exc}; set FRUGALMESH_GATEWAY_PORT") from exc
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """The replica's HTTP side: keys, routes and uvicorn, started once the bus is connected."""

    def __init__(
        self, bus: Bus, catalog: Catalog, settings: MeshSettings, host: str, port: int, task_limits: TaskLimits
    ) -> None:
        self.bus = bus
        self.catalog = catalog
        self.settings = settings
        self.host = host
        self.port = port
        self.task_limits = task_limits
        self.keys: KeyCache | None = None
        self.recorder: GatewayRecorder | None = None
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Serve; returns the base URL once requests are taken."""
        self.keys = await KeyCache.open(self.bus)
        tasks = await GatewayTasks.open(self.bus, self.task_limits)
        gateway = Gateway(self.bus, self.catalog, self.keys, self.settings.request_timeout_s, tasks)
        http_app = create_http_app(gateway)
        if self.settings.gateway_record:
            # Off by default, and then not even wrapped (services/gateway/recording.py).
            self.recorder = await GatewayRecorder.open(self.settings.gateway_record, self.keys.lookup, self.bus.log)
        sock = bind(self.host, self.port)
        config = uvicorn.Config(
            self.recorder.wrap(http_app) if self.recorder else http_app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            # Open streams get this long to end at shutdown; their calls are metered either way.
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        )
        server = self.server = _Server(config)
        task = self.task = asyncio.create_task(server.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("the gateway's HTTP server stopped during start-up")
            if loop.time() > deadline:
                raise TimeoutError(f"the gateway's HTTP server did not start in {STARTUP_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.01)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, SHUTDOWN_TIMEOUT_S + 1)
        if self.recorder is not None:  # after the server: streams that ended at shutdown are recorded too
            await self.recorder.close()
        if self.keys is not None:
            await self.keys.close()


def create_app(
    settings: MeshSettings,
    *,
    host: str | None = None,
    port: int | None = None,
    listening: Callable[[str], None] | None = None,
    task_limits: TaskLimits | None = None,
) -> FastStream:
    """The gateway on ``host``:``port`` (default: settings' ``gateway_host`` / ``gateway_port``;
    port 0 picks a free one); ``listening`` is called with its base URL once it serves.
    ``task_limits``: layer 2 for its tasks (default: deploy/planner.toml)."""
    bus = Bus(settings, SERVICE)
    http = HttpServer(
        bus,
        Catalog.load(settings.deploy_dir),
        settings,
        host or settings.gateway_host,
        settings.gateway_port if port is None else port,
        task_limits or TaskLimits.load(settings.deploy_dir),
    )
    app = bus.app()

    # Registered after bus.app()'s hook, which connects the broker.
    @app.on_startup
    async def serve_http() -> None:
        url = await http.start()
        bus.log.info("gateway_listening", url=url)
        if listening is not None:
            listening(url)

    app.on_shutdown(http.stop)
    return app
