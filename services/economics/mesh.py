"""The real mesh the experiments run through, and the one way they ask it a recorded question.

Each experiment starts its own stack (``Stack``, as `frugalmesh demo` does, without the local engine
and agents it does not use) in a temporary home, so a run never meets an earlier run's response
cache, budgets or attempt counters, and its figures depend on its seed alone. Its deploy directory
is a copy of deploy/ with two changes, both written into the copy's files:

- latency: every model the replay backend serves answers after ``latency_s`` of deploy/planner.toml
  (the figure the pre-flight estimate assumes) times ``time_scale`` (``ttft_ms`` in models.toml), so
  measured critical paths are comparable with the estimate's; 0 answers at once;
- policies: tenants named in ``policies`` are routed by that policy (routing.toml ``[policies]
  tenants``), e.g. an arm's tenant by ``cascade``.

One step of an experiment is one mesh task of the ``answer`` workflow whose goal is a recorded
prompt: the replay backend finds the recorded answer by the goal, so one task can replay one
recorded prompt, and a multi-step job is several tasks, sequenced or run in parallel by the
experiment. Everything a step costs is read from the accountant's rows in ClickHouse
(``usage_events``), its correctness from the recorded grade the answer carries (``graded``).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import clickhouse_connect
import msgspec
from nats.aio.msg import Msg

from schemas.messages import TERMINAL_EVENTS, ArtifactGet, ArtifactReply, Task, TaskEvent
from schemas.subjects import HEADER_MSG_ID, STREAM_TASKS
from services.embedded.stack import Stack
from services.runtime.bus import Bus, now_ms
from services.runtime.settings import REPO_DEPLOY_DIR, MeshSettings

# A step's task may take this long; the replay answers in well under a second.
STEP_DEADLINE_S = 120.0
# Outcomes of usage rows that were a model's answer (a cache hit, a refusal or a kill was not).
ANSWERED = ("ok", "error", "timeout")


def experiment_deploy(dest: Path, time_scale: float, policies: dict[str, str], base: Path = REPO_DEPLOY_DIR) -> Path:
    """Write ``dest``: ``base`` (without loadtest/) with the replay latency and tenant policies above."""
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("loadtest"), dirs_exist_ok=True)
    planner = tomllib.loads((dest / "planner.toml").read_text())
    models_file = dest / "models.toml"
    models_text = models_file.read_text()
    catalogue = tomllib.loads(models_text)
    for name, spec in catalogue["models"].items():
        if not spec.get("recorded_as") or time_scale <= 0:
            continue
        if "ttft_ms" in spec:
            raise ValueError(f"{models_file}: model {name} already sets ttft_ms; the experiment sets it")
        ttft_ms = planner["models"][name]["latency_s"] * 1000 * time_scale
        header = f"[models.{name}]"
        models_text = re.sub(rf"(?m)^{re.escape(header)}$", f"{header}\nttft_ms = {ttft_ms:g}", models_text)
    models_file.write_text(models_text)
    if policies:
        routing_file = dest / "routing.toml"
        mapping = ", ".join(f'"{tenant}" = "{policy}"' for tenant, policy in policies.items())
        routing, replaced = re.subn(r"(?m)^tenants = \{.*\}$", f"tenants = {{ {mapping} }}", routing_file.read_text())
        if replaced != 1 or tomllib.loads(routing)["policies"]["tenants"] != policies:
            raise ValueError(f"{routing_file}: expected one one-line `tenants = {{...}}` in [policies] to set")
        routing_file.write_text(routing)
    return dest


@contextmanager
def experiment_mesh(
    data_dir: Path, time_scale: float = 0.0, policies: dict[str, str] | None = None
) -> Iterator[MeshSettings]:
    """A running stack on a temporary home and deploy directory; its settings while it runs. Both are
    removed afterwards, unless the run failed: then its service logs stay where the error says."""
    tmp = Path(tempfile.mkdtemp(prefix="frugalmesh-experiment-"))
    home = tmp / "home"
    deploy = experiment_deploy(tmp / "deploy", time_scale, policies or {})
    settings = MeshSettings(home=home, deploy_dir=deploy, data=data_dir, subject_prefix="exp" + uuid.uuid4().hex[:8])
    stack = Stack(home=home, nats_port=-1, clickhouse_port=0, settings=settings, local_engine=None, agents={})
    with stack:
        yield stack.settings
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class StepOutcome:
    """One step (one mesh task) as it ended, and, once ``account`` has read them, its books."""

    task_id: str
    tenant: str
    kind: str
    graded: bool | None
    model: str
    wall_s: float
    detail: str = ""
    # The planner's own running totals on the terminal event, known the moment the task ends.
    planner_calls: int = 0
    planner_cost_usd: float = 0.0
    # The accountant's books, filled by ``MeshRunner.account``: calls a model answered, cache hits, USD.
    calls: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0

    @property
    def correct(self) -> bool:
        return self.kind == "done" and self.graded is True


@dataclass
class MeshRunner:
    """``async with MeshRunner(settings) as mesh``: ``await mesh.ask(prompt, tenant)`` runs one step."""

    settings: MeshSettings
    concurrency: int = 16
    outcomes: list[StepOutcome] = field(default_factory=list)

    async def __aenter__(self) -> MeshRunner:
        self.bus = Bus(self.settings, "experiment", reconnect_attempts=3)
        await self.bus.connect()
        self.subjects = self.settings.subjects
        self.slots = asyncio.Semaphore(self.concurrency)
        self.waiting: dict[str, asyncio.Future[TaskEvent]] = {}
        self.subscription = await self.bus.subscribe_core(self.subjects.task_events, self._on_event)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.subscription.unsubscribe()
        await self.bus.close()

    async def _on_event(self, msg: Msg) -> None:
        event = msgspec.json.decode(msg.data, type=TaskEvent)
        waiting = self.waiting.get(event.task_id)
        if event.kind in TERMINAL_EVENTS and waiting is not None and not waiting.done():
            waiting.set_result(event)

    async def ask(
        self, prompt: str, tenant: str, *, allow_models: list[str] | None = None, budget_usd: float | None = None
    ) -> StepOutcome:
        """Run ``prompt`` as one ``answer`` task of ``tenant`` and wait for its end."""
        async with self.slots:
            task = Task(
                id=uuid.uuid4().hex,
                tenant=tenant,
                goal=prompt,
                allow_models=allow_models,
                budget_usd=budget_usd,
                deadline_s=STEP_DEADLINE_S,
                submitted_ms=now_ms(),
            )
            ended = self.waiting[task.id] = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            await self.bus.publish(
                self.subjects.task_submit(task.tenant),
                task,
                stream=self.subjects.stream(STREAM_TASKS),
                headers={HEADER_MSG_ID: task.dedupe_id()},
            )
            event = await asyncio.wait_for(ended, STEP_DEADLINE_S + 30)
            wall_s = time.perf_counter() - started
            del self.waiting[task.id]
            graded, model = None, ""
            if event.kind == "done" and event.artifact is not None:
                artifact = await self._artifact(event.artifact.id, tenant)
                graded, model = artifact.get("graded"), artifact.get("model", "")
        outcome = StepOutcome(
            task.id, tenant, event.kind, graded, model, wall_s, event.detail, event.calls, event.cost_usd
        )
        self.outcomes.append(outcome)
        return outcome

    async def _artifact(self, artifact_id: str, tenant: str) -> dict:
        """The answer's body ({} when the store has none)."""
        request = ArtifactGet(id=artifact_id, tenant=tenant)
        reply = await self.bus.request(self.subjects.artifact_get(tenant), request, ArtifactReply, 10.0)
        return reply.artifact.body if reply.artifact is not None else {}

    def account(self, timeout_s: float = 60.0) -> None:
        """Fill every outcome's calls, cache hits and cost from the accountant's rows, once all are in
        (the accountant ingests asynchronously: wait until the rows cover every call and stop growing)."""
        ids = [o.task_id for o in self.outcomes]
        if not ids:
            return
        client = clickhouse_connect.get_client(dsn=self.settings.clickhouse_url)
        query = (
            "SELECT task_id, countIf(outcome IN %(answered)s), countIf(outcome = 'cache_hit'), "
            "toFloat64(sum(cost_usd)), count() FROM usage_events FINAL WHERE task_id IN %(ids)s GROUP BY task_id"
        )
        expected = sum(o.planner_calls for o in self.outcomes)
        deadline = time.monotonic() + timeout_s
        seen = -1
        while True:
            rows = client.query(query, parameters={"ids": ids, "answered": ANSWERED}).result_rows
            total = sum(row[4] for row in rows)
            if total >= expected and total == seen:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"after {timeout_s:.0f} s the accountant's rows cover {total} of the run's {expected} calls: "
                    "its log (in the experiment's home) says why"
                )
            seen = total
            time.sleep(0.5)
        books = {row[0]: row[1:4] for row in rows}
        for outcome in self.outcomes:
            outcome.calls, outcome.cache_hits, outcome.cost_usd = books.get(outcome.task_id, (0, 0, 0.0))
