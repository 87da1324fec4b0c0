"""Replication as a setting (FRUGALMESH_REPLICAS) on a real three-node JetStream cluster, NATS_URL as a
list of seeds, and the cluster's configuration: the one `frugalmesh up --cluster 3` starts and the one
deploy/nats/ ships for three hosts."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from click.testing import CliRunner
from helpers import eventually
from nats.js.errors import NoStreamResponseError

from schemas.subjects import BUCKET_LEDGER, STREAM_USAGE, Subjects
from services.cli.main import cli
from services.embedded.cluster import CLUSTER_NAME, NODE_CONFIG, EmbeddedNatsCluster
from services.embedded.creds import CredentialStore
from services.runtime.bus import Bus
from services.runtime.identities import Identity
from services.runtime.settings import REPO_DEPLOY_DIR, MeshSettings
from services.runtime.streams import stream_configs

CLUSTER_CONF = REPO_DEPLOY_DIR / "nats" / "cluster.conf"


def cluster_settings(cluster: EmbeddedNatsCluster, replicas: int) -> MeshSettings:
    return MeshSettings(nats_url=cluster.url, subject_prefix="c" + uuid.uuid4().hex[:10], replicas=replicas)


async def replicas_of(bus: Bus, stream: str) -> tuple[int, int]:
    """(configured copies, copies the cluster reports current: the leader and its current followers)."""
    info = await bus.jetstream.stream_info(stream)
    assert info.cluster is not None
    current = 1 + sum(1 for peer in info.cluster.replicas or [] if peer.current)
    return info.config.num_replicas or 1, current


async def all_current(bus: Bus, stream: str, replicas: int) -> None:
    """Wait until ``stream`` has ``replicas`` copies, all caught up (a new follower catches up first)."""

    async def caught_up() -> bool:
        return await replicas_of(bus, stream) == (replicas, replicas)

    await eventually(caught_up, timeout_s=30, message=lambda: f"{stream} not {replicas} current copies")


async def once_led(write: Callable[[], Awaitable[object]]) -> None:
    """``write`` into a stream just created or changed: sent again while it elects its leader."""

    async def written() -> bool:
        try:
            await write()
        except NoStreamResponseError:
            return False
        return True

    await eventually(written, timeout_s=30, message="the stream never elected a leader")


@pytest.mark.unit
def test_nats_url_takes_a_comma_separated_list_of_seeds(monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://a:4222, nats://b:4222,nats://c:4222")
    monkeypatch.setenv("FRUGALMESH_REPLICAS", "3")
    settings = MeshSettings()
    assert settings.nats_servers == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert settings.replicas == 3
    assert MeshSettings(nats_url="nats://one:4222").nats_servers == ["nats://one:4222"]


@pytest.mark.unit
def test_replicas_out_of_jetstreams_range_are_refused(monkeypatch):
    monkeypatch.setenv("FRUGALMESH_REPLICAS", "7")
    with pytest.raises(ValueError, match="replicas"):
        MeshSettings()


@pytest.mark.unit
def test_every_mesh_stream_is_declared_with_the_replica_count():
    configs = stream_configs(MeshSettings().subjects, 3)
    assert configs and {config.num_replicas for config in configs} == {3}


@pytest.mark.infra
async def test_every_stream_bucket_and_store_keeps_three_copies_on_the_cluster(nats_cluster):
    settings = cluster_settings(nats_cluster, replicas=3)
    bus = Bus(settings, "test")
    await bus.connect()  # through the seed list
    try:
        await bus.declare_streams()
        kv = await bus.key_value(settings.subjects.bucket("r3_kv"), history=2)
        store = await bus.object_store(settings.subjects.bucket(BUCKET_LEDGER))
        await once_led(lambda: kv.put("k", b"v"))
        await once_led(lambda: store.put("o", b"body"))
        streams = [config.name for config in stream_configs(settings.subjects)]
        streams += [f"KV_{settings.subjects.bucket('r3_kv')}", f"OBJ_{settings.subjects.bucket(BUCKET_LEDGER)}"]
        for stream in streams:
            await all_current(bus, stream, 3)
    finally:
        await bus.close()


@pytest.mark.infra
async def test_existing_streams_and_buckets_are_raised_to_the_setting(nats_cluster):
    one = cluster_settings(nats_cluster, replicas=1)
    three = one.model_copy(update={"replicas": 3})
    bucket = one.subjects.bucket("grown")
    before = Bus(one, "test")
    await before.connect()
    try:
        await before.declare_streams()
        kv = await before.key_value(bucket)
        await once_led(lambda: kv.put("k", b"v"))
        await before.object_store(one.subjects.bucket(BUCKET_LEDGER))
        assert await replicas_of(before, one.subjects.stream(STREAM_USAGE)) == (1, 1)
    finally:
        await before.close()
    after = Bus(three, "test")
    await after.connect()
    try:
        await after.declare_streams()
        kv = await after.key_value(bucket)
        await after.object_store(three.subjects.bucket(BUCKET_LEDGER))
        assert (await kv.get("k")).value == b"v"
        store = f"OBJ_{three.subjects.bucket(BUCKET_LEDGER)}"
        for stream in (three.subjects.stream(STREAM_USAGE), f"KV_{bucket}", store):
            await all_current(after, stream, 3)
    finally:
        await after.close()


@pytest.mark.infra
def test_every_node_fsyncs_each_write_and_knows_its_peers(nats_cluster):
    names = set()
    for node in nats_cluster.nodes:
        monitor = f"http://{node.server.host}:{node.monitor_port}"
        varz = httpx.get(f"{monitor}/varz", timeout=5).json()
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert varz["cluster"]["name"] == CLUSTER_NAME
        routes = httpx.get(f"{monitor}/routez", timeout=5).json()
        assert {route["remote_name"] for route in routes["routes"]} == {n.name for n in nats_cluster.nodes} - {
            node.name
        }
        names.add(varz["server_name"])
    assert names == {"n1", "n2", "n3"}


@pytest.mark.infra
def test_the_shipped_three_host_configuration_is_valid_and_matches_the_embedded_one(tmp_path):
    binary = shutil.which("nats-server")
    assert binary is not None
    # Beside it, the identities' file it includes, as `frugalmesh creds init` writes it.
    store = CredentialStore(tmp_path)
    store.ensure(Identity("service", "router"))
    store.write_auth(Subjects(), tmp_path)
    shutil.copy(CLUSTER_CONF, tmp_path / CLUSTER_CONF.name)
    checked = subprocess.run(
        [binary, "-t", "-c", str(tmp_path / CLUSTER_CONF.name)],
        env={"NATS_SERVER_NAME": "nats-1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    shipped = CLUSTER_CONF.read_text()
    # The settings that make the cluster what it is are the same in both.
    assert re.search(r"(?m)^\s*sync_interval: always$", shipped) and "sync_interval: {sync_interval}" in NODE_CONFIG
    assert re.search(rf"(?m)^\s*name: {CLUSTER_NAME}$", shipped)
    assert len(re.findall(r"nats://nats-\d:6222", shipped)) == 3


@pytest.mark.unit
def test_up_offers_a_cluster_and_refuses_a_negative_size():
    result = CliRunner().invoke(cli, ["up", "--cluster", "-1"])
    assert result.exit_code == 2 and "--cluster" in result.output
    assert "--cluster" in CliRunner().invoke(cli, ["up", "--help"]).output
