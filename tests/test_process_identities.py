"""Each process of the mesh on its own NATS credential, with only the secrets it uses: `frugalmesh up`'s
processes and compose.yaml's services (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.embedded.creds import process_identity
from services.embedded.stack import SHIPPED_AGENTS, Stack, provider_key_names
from services.registry import SERVICES
from services.runtime.catalog import Catalog
from services.runtime.grants import SEED_ENV, SEED_FILE_ENV
from services.runtime.identities import Identity
from services.runtime.settings import REPO_DEPLOY_DIR, MeshSettings


@pytest.mark.unit
def test_up_gives_each_process_its_own_credential_and_only_the_secrets_it_uses(tmp_path, monkeypatch):
    catalog_keys = provider_key_names(Catalog.load(REPO_DEPLOY_DIR))
    for variable in set().union(*catalog_keys.values()):
        monkeypatch.setenv(variable, f"secret-{variable}")
    monkeypatch.setenv("FRUGALMESH_NATS_CREDS", str(tmp_path / "operator.someone-else.nk"))
    writer = "http://writer:pw@127.0.0.1:8123/frugalmesh"
    stack = Stack(home=tmp_path, settings=MeshSettings(home=tmp_path, clickhouse_url=writer))
    stack.write_identities()

    environments = stack.process_environments()

    assert set(environments) == {*SERVICES, *SHIPPED_AGENTS}
    for name, env in environments.items():
        creds = Path(env["FRUGALMESH_NATS_CREDS"])
        assert Identity.of_file(creds) == process_identity(name) and creds.parent == tmp_path / "creds", name
        assert "NATS_CREDS" not in env
        keys = {variable for variable in set().union(*catalog_keys.values()) if variable in env}
        assert keys == catalog_keys.get(name, set()), name
        assert ("CLICKHOUSE_URL" in env) == (name == "accountant"), name
        assert (env.get(SEED_ENV) or env.get(SEED_FILE_ENV) or "") == "" or name == "accountant", name
    assert Identity.of_file(stack.creds["operator"]).kind == "operator"


@pytest.mark.unit
def test_compose_runs_every_service_on_its_own_credential_and_nats_lets_in_only_the_identities():
    """What `frugalmesh creds init` makes is what compose.yaml mounts: each service its own seed, under a
    name that says whose it is (what the service reads its identity from), the grant seed to the
    accountant alone, the servers the authorization file (single server and cluster nodes)."""
    repo = Path(__file__).resolve().parents[1]
    compose = yaml.safe_load((repo / "compose.yaml").read_text())["services"]
    runs = {name: spec for name, spec in compose.items() if spec.get("command", [None])[0] == "run"}
    assert set(runs) == set(SERVICES)
    for name, spec in runs.items():
        env = spec["environment"]
        mounts = dict(volume.rsplit(":", 2)[:2] for volume in spec["volumes"] if volume.startswith("./"))
        target = Path(env["FRUGALMESH_NATS_CREDS"])
        assert Identity.of_file(target) == Identity("service", name), name
        assert {mounts[f"./.frugalmesh/creds/{target.name}"]} == {str(target)}, name
        assert "FRUGALMESH_GRANT_PUBLIC_KEY" in env, name
        assert ("./.frugalmesh/grant.seed" in mounts) == (name == "accountant") == (SEED_FILE_ENV in env), name
    for name in ("nats", "nats-1", "nats-2", "nats-3"):
        assert "./.frugalmesh/nats-auth.conf:/etc/nats/nats-auth.conf:ro" in compose[name]["volumes"], name
    for config in ("single.conf", "cluster.conf"):
        assert 'include "nats-auth.conf"' in (repo / "deploy" / "nats" / config).read_text(), config
