"""What the benchmarks share: a private stack on free ports, open-loop pacing, CPU time by process."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from loadtest.deploy import LOADTEST_MODELS, loadtest_deploy_dir
from services.embedded.stack import Stack
from services.runtime.settings import MeshSettings


def zero_latency_models() -> str:
    """deploy/loadtest/models.toml with the latency model and prefix cache off: a benchmark
    measures the mesh, not a model."""
    keys = "ttft_ms|prefill_tokens_per_s|output_tokens_per_s|prompt_cache_block_tokens"
    return re.sub(rf"(?m)^({keys}) = .*\n", "", LOADTEST_MODELS.read_text())


@contextmanager
def bench_stack(models_toml: str) -> Iterator[MeshSettings]:
    """nats-server, ClickHouse and the six services, in a temporary home, on ``models_toml``
    (no local engine: the load-test models answer on the synthetic backend)."""
    with tempfile.TemporaryDirectory(prefix="frugalmesh-bench-") as tmp:
        deploy = loadtest_deploy_dir(Path(tmp) / "deploy")
        (deploy / "models.toml").write_text(models_toml)
        home = Path(tmp) / "home"
        # The services are child processes: they read the deploy directory from the environment.
        os.environ["FRUGALMESH_DEPLOY_DIR"] = str(deploy)
        settings = MeshSettings(deploy_dir=deploy, home=home, subject_prefix="bench" + uuid.uuid4().hex[:6])
        with Stack(home=home, nats_port=-1, clickhouse_port=0, settings=settings, local_engine=None) as stack:
            yield stack.settings


async def open_loop(rate_per_s: float, count: int, call: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """Start ``call(i)`` at i / rate seconds whatever earlier calls are doing; return the send span, s."""
    started = time.monotonic()
    running: set[asyncio.Task[None]] = set()
    for i in range(count):
        delay = started + i / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(call(i))
        running.add(task)
        task.add_done_callback(running.discard)
    span = time.monotonic() - started
    await asyncio.gather(*running)
    return span


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (the load generator) and each of
    its child processes, the stack's servers and services, by name."""
    return _by_process(_cpu_seconds)


def rss_kb_by_process() -> dict[str, float]:
    """Resident memory (KB) of this process and each of the stack's, by name."""
    return _by_process(lambda process: process.memory_info().rss / 1024)


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _by_process(measure: Callable[[psutil.Process], float]) -> dict[str, float]:
    """``measure`` of this process and each of its children, summed by process name."""
    me = psutil.Process()
    totals: dict[str, float] = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            name = _process_name(process, me)
            totals[name] = totals.get(name, 0.0) + measure(process)
        except psutil.NoSuchProcess:
            continue
    return totals


def _process_name(process: psutil.Process, me: psutil.Process) -> str:
    if process.pid == me.pid:
        return "load generator"
    command = process.cmdline()
    if "services.cli.main" in command:
        return command[command.index("run") + 1]  # `services.cli.main run <service> ...`
    if "services.embedded.chserver" in command:
        return "clickhouse"
    return Path(command[0]).name if command else process.name()
