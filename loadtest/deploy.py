"""The deploy directory a load test's own stack runs with.

deploy/loadtest/models.toml puts every provider on the synthetic backend with a latency model;
everything else (routing table, workflows, the other configs) is deploy/'s own, copied next to
it, so a replay exercises the same routing, budgets and workflows the real mesh runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.runtime.settings import REPO_DEPLOY_DIR

LOADTEST_MODELS = REPO_DEPLOY_DIR / "loadtest" / "models.toml"


def loadtest_deploy_dir(dest: Path, models: Path = LOADTEST_MODELS, base: Path = REPO_DEPLOY_DIR) -> Path:
    """Write ``dest``: a copy of ``base`` (without its loadtest/ folder) with ``models`` as models.toml."""
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("loadtest"), dirs_exist_ok=True)
    shutil.copyfile(models, dest / "models.toml")
    return dest
