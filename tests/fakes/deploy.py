"""A temporary deploy folder whose catalogue sends providers to loopback fake APIs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from services.runtime.settings import REPO_DEPLOY_DIR


def fake_providers_deploy(dest: Path, base_urls: dict[str, str]) -> Path:
    """A copy of deploy/ in ``dest`` whose providers named in ``base_urls`` (provider -> URL) are on
    the openai backend at that URL instead of the shipped replay backend (keys still come from the
    environment, e.g. OPENAI_API_KEY)."""
    shutil.copytree(REPO_DEPLOY_DIR, dest)
    models = dest / "models.toml"
    text = models.read_text()
    for provider, url in base_urls.items():
        shipped = re.compile(rf'\[providers\.{provider}\]\nbackend = "replay"\nbase_url = "[^"\n]*"')
        assert shipped.search(text), f"deploy/models.toml no longer ships [providers.{provider}] on replay"
        text = shipped.sub(f'[providers.{provider}]\nbackend = "openai"\nbase_url = "{url}"', text)
    models.write_text(text)
    return dest


def openai_deploy(dest: Path, base_url: str) -> Path:
    """A copy of deploy/ in ``dest`` with ``[providers.openai]`` on the openai backend at ``base_url``."""
    return fake_providers_deploy(dest, {"openai": base_url})
