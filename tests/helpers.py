"""What many tests build or wait for: messages with the defaults most tests want, and a wait for a
condition to come true.

Nothing here touches a server: talking to a live mesh as a client is ``mesh_client.py``, the
fixtures are in ``conftest.py``, and the test peers and fake APIs are in ``fakes/``.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from schemas.messages import ChatMessage, InferenceRequest, KillSwitch, PaceSignal, StepRequest, Task
from schemas.subjects import OPERATOR_BUDGET, Subjects
from services.runtime.bus import now_ms
from services.runtime.catalog import Catalog
from services.runtime.settings import REPO_DEPLOY_DIR, MeshSettings

T = TypeVar("T")

# A short GSM8K-style question: the rules send a short "answer" step to the local tier.
SHORT = "A farmer has 12 cows and buys 5 more. How many cows does he have?"


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    timeout_s: float = 10.0,
    *,
    interval_s: float = 0.02,
    message: str | Callable[[], str] = "condition not met in time",
) -> T:
    """Call ``check`` (sync or async) until it returns something truthy, and return that.

    For a positive event only: waiting for something to happen. Never for "nothing happened":
    wait for a later event that must come after it instead (see test_schedule.py, test_budget.py).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(interval_s)


@cache
def shipped_catalog() -> Catalog:
    """deploy/models.toml, loaded once per session."""
    return Catalog.load(REPO_DEPLOY_DIR)


def make_step(
    content: str = SHORT,
    *,
    tenant: str = "acme",
    workflow: str = "answer",
    role: str = "solve",
    task_id: str = "task-1",
    step_id: str = "step-1",
    max_tokens: int = 256,
    deadline_in_ms: int = 5_000,
    **fields,
) -> StepRequest:
    """A one-message step as the planner sends it to the router (``fields``: any other field)."""
    return StepRequest(
        task_id=task_id,
        step_id=step_id,
        tenant=tenant,
        workflow=workflow,
        role=role,
        messages=[ChatMessage(role="user", content=content)],
        max_tokens=max_tokens,
        deadline_ms=now_ms() + deadline_in_ms,
        **fields,
    )


def make_request(
    model: str,
    content: str,
    *,
    system: str | None = None,
    tenant: str = "acme",
    step_id: str = "step-1",
    max_tokens: int = 512,
    deadline_s: float = 10.0,
) -> InferenceRequest:
    """One call of ``model`` (a shipped catalogue model: its tier comes from there), as the router
    sends it to an inference service; a fresh call id each time."""
    messages = [ChatMessage(role="user", content=content)]
    if system is not None:
        messages.insert(0, ChatMessage(role="system", content=system))
    return InferenceRequest(
        call_id=uuid.uuid4().hex,
        task_id="task-1",
        step_id=step_id,
        tenant=tenant,
        model=model,
        tier=shipped_catalog().model(model).tier,
        messages=messages,
        max_tokens=max_tokens,
        deadline_ms=now_ms() + int(deadline_s * 1000),
    )


def new_task(**fields) -> Task:
    """A task with a fresh id, submitted now."""
    return Task(id=uuid.uuid4().hex[:12], submitted_ms=int(time.time() * 1000), **fields)


def budget_set(subjects: Subjects) -> str:
    """Where this process's operator changes caps: its own operator subject (the name in its credential)."""
    return subjects.operator(MeshSettings().operator, OPERATOR_BUDGET)


def kill_switch(scope: str = "global", key: str = "*", tripped: bool = True, reason: str = "test trip") -> KillSwitch:
    return KillSwitch(scope=scope, key=key, tripped=tripped, reason=reason, by="test", time_ms=now_ms())


def pace_signal(tenant: str, action: str, *, spend_usd: float = 2.0, curve_usd: float = 1.0) -> PaceSignal:
    return PaceSignal(tenant=tenant, action=action, spend_usd=spend_usd, curve_usd=curve_usd, time_ms=now_ms())


def deploy_with(tmp_path: Path, **workflows: str) -> Path:
    """A copy of deploy/ with extra workflows (name -> TOML text)."""
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_DEPLOY_DIR, deploy)
    for name, text in workflows.items():
        (deploy / "workflows" / f"{name}.toml").write_text(text)
    return deploy


def database_url(url: str, database: str) -> str:
    """``url`` (a ClickHouse URL) with ``database`` as the database its queries' unqualified tables are in."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))
