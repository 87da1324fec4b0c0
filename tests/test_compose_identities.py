"""compose.yaml runs each service on its own NATS credential, as `frugalmesh up` does (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.registry import SERVICES
from services.runtime.identities import Identity


@pytest.mark.unit
def test_compose_runs_every_service_on_its_own_credential_and_nats_lets_in_only_the_identities(tmp_path):
    """What `frugalmesh creds init` makes is what compose.yaml mounts: each service its own seed, the
    server the authorization file (single server and cluster nodes)."""
    repo = Path(__file__).resolve().parents[1]
    compose = yaml.safe_load((repo / "compose.yaml").read_text())["services"]
    runs = {name: spec for name, spec in compose.items() if spec.get("command", [None])[0] == "run"}
    assert set(runs) == set(SERVICES)
    for name, spec in runs.items():
        seed = f"./.frugalmesh/creds/{Identity('service', name).file_name}"
        assert f"{seed}:{spec['environment']['FRUGALMESH_NATS_CREDS']}:ro" in spec["volumes"], name
    for name in ("nats", "nats-1", "nats-2", "nats-3"):
        assert "./.frugalmesh/nats-auth.conf:/etc/nats/nats-auth.conf:ro" in compose[name]["volumes"], name
    for config in ("single.conf", "cluster.conf"):
        assert 'include "nats-auth.conf"' in (repo / "deploy" / "nats" / config).read_text(), config
