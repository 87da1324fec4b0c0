"""A new router file is picked up without a restart.

`frugalmesh router train --from-clickhouse` and `frugalmesh router rollback` replace the router
file that deploy/routing.toml names in one rename (services/router_training/versions.py), so a
reader sees the old file or the new one, never half of one. Each replica checks the file's
identity (inode, size, mtime) every ``interval_s`` and, when it changed, builds the policies again
from routing.toml in a worker thread and swaps them in between two steps. A file that does not
load is logged and the policies in force stay: a bad version never stops routing.

The online policy starts again from the new file's labels (which hold every label the file was
trained from); what it learned in memory since the old file was read is in ClickHouse too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from services.router.steps import StepRouter
from services.routing.policies import PolicySet
from services.routing.table import RoutingTable
from services.runtime.catalog import Catalog

DEFAULT_INTERVAL_S = 5.0


def file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class RouterFileWatch:
    def __init__(
        self, router: StepRouter, deploy_dir: Path, table: RoutingTable, catalog: Catalog, interval_s: float
    ) -> None:
        self.router = router
        self.deploy_dir = deploy_dir
        self.table = table
        self.catalog = catalog
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = self.router.policies.router_file
        if path is not None and self.interval_s > 0:
            self._task = asyncio.create_task(self._watch(path, file_identity(path)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, path: Path, seen: tuple[int, int, int] | None) -> None:
        log = self.router.log
        while True:
            await asyncio.sleep(self.interval_s)
            current = file_identity(path)
            if current is None or current == seen:
                continue
            seen = current
            try:
                policies = await asyncio.to_thread(PolicySet.load, self.deploy_dir, self.table, self.catalog)
            except Exception as exc:  # any unreadable file: keep routing with what is loaded
                log.error("router_file_reload_failed", path=str(path), error=str(exc))
                continue
            self.router.policies = policies
            log.info("router_file_reloaded", path=str(path), version=_version(policies))


def _version(policies: PolicySet) -> int | None:
    loaded = policies.named.loaded_file if policies.named is not None else None
    return loaded.provenance.get("version") if loaded is not None else None
