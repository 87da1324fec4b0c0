"""Versions of a router file: every file `frugalmesh router train --from-clickhouse` makes is kept
beside the live one, and any of them can be made live again (`frugalmesh router rollback`).

Layout, for the live file ``routers/online.npz`` that deploy/routing.toml names:
``routers/online.v0001.npz``, ``routers/online.v0002.npz``, ... each with its provenance in its
header (``RouterFile.provenance``: its version, when, from which labels, its held-out figures).
Making a version live copies it to a temporary file in the same folder and renames that over the
live file: a router reading it (services/router/reload.py) sees one whole file or the other.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from services.routing.policies.routerfile import RouterFile


def version_path(live: Path, version: int) -> Path:
    return live.with_name(f"{live.stem}.v{version:04d}{live.suffix}")


def versions(live: Path) -> dict[int, Path]:
    """The versions kept beside ``live``, by number."""
    pattern = re.compile(rf"^{re.escape(live.stem)}\.v(\d+){re.escape(live.suffix)}$")
    found = {}
    for path in live.parent.glob(f"{live.stem}.v*{live.suffix}"):
        match = pattern.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def live_version(live: Path) -> int | None:
    """The version the live file is a copy of (None: a file made outside versioning, or none)."""
    if not live.is_file():
        return None
    version = RouterFile.load(live).provenance.get("version")
    return int(version) if version is not None else None


def make_live(source: Path, live: Path) -> None:
    """Replace ``live`` by a copy of ``source`` in one rename."""
    live.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=live.parent, prefix=f".{live.name}.", suffix=".tmp")
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, live)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def publish(router_file: RouterFile, live: Path) -> tuple[int, Path]:
    """Save ``router_file`` as the next version beside ``live`` and make it live."""
    version = max(versions(live), default=0) + 1
    path = version_path(live, version)
    router_file.provenance["version"] = version
    router_file.save(path)
    make_live(path, live)
    return version, path


def rollback(live: Path, to: int | None = None) -> int:
    """Make version ``to`` live (default: the one before the live version); returns it."""
    kept = versions(live)
    if not kept:
        raise ValueError(f"no versions of {live} ({version_path(live, 1).name}, ...) to roll back to")
    if to is None:
        current = live_version(live)
        earlier = [v for v in kept if current is None or v < current]
        if not earlier:
            raise ValueError(f"{live} is version {current}, the first one kept: nothing before it")
        to = earlier[-1]
    if to not in kept:
        raise ValueError(f"no version {to} of {live}; kept: {', '.join(map(str, kept))}")
    make_live(kept[to], live)
    return to
