"""A temporary deploy folder whose catalogue sends provider ``openai`` to a loopback fake API."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.runtime.settings import REPO_DEPLOY_DIR

SHIPPED = '[providers.openai]\nbackend = "replay"\nbase_url = "https://api.openai.com/v1"'


def openai_deploy(dest: Path, base_url: str) -> Path:
    """A copy of deploy/ in ``dest`` with ``[providers.openai]`` on the openai backend at ``base_url``
    (the key still comes from OPENAI_API_KEY)."""
    shutil.copytree(REPO_DEPLOY_DIR, dest)
    models = dest / "models.toml"
    text = models.read_text()
    assert SHIPPED in text, "deploy/models.toml no longer ships [providers.openai] on replay"
    models.write_text(text.replace(SHIPPED, f'[providers.openai]\nbackend = "openai"\nbase_url = "{base_url}"'))
    return dest
