"""`frugalmesh demo`: recorded GSM8K and MMLU prompts through the live mesh, against frontier-only.

Every number in the table comes from the run: the mesh's side is read back from ClickHouse
(the accountant's rows), accuracy from the recorded grades of the answers the mesh returned;
the frontier-only side prices the same prompts on the frontier model with the same replay
backend, tokenizer and price table the mesh itself uses.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import clickhouse_connect
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.messages import TERMINAL_EVENTS, Task, TaskEvent
from services.cli.client import MeshClient, new_task_id
from services.embedded.stack import Stack, client_settings, running_stack
from services.inference.replay import frontier_baseline
from services.runtime.catalog import Catalog
from services.runtime.data import Record, load_recorded_outcomes
from services.runtime.settings import MeshSettings

DEMO_TENANT = "demo"


def sample_prompts(records: list[Record], n: int, seed: int) -> list[Record]:
    """Half GSM8K, half MMLU (spread over its domains), the same for the same seed."""
    rng = random.Random(seed)
    gsm8k = [r for r in records if r.dataset == "gsm8k"]
    mmlu = [r for r in records if r.dataset.startswith("mmlu/")]
    return rng.sample(gsm8k, n // 2) + rng.sample(mmlu, n - n // 2)


@dataclass
class RunResult:
    events: dict[str, TaskEvent] = field(default_factory=dict)
    graded: dict[str, bool | None] = field(default_factory=dict)
    wall_s: float = 0.0


async def push_tasks(settings: MeshSettings, prompts: list[Record], concurrency: int) -> RunResult:
    result = RunResult()
    finished: dict[str, asyncio.Event] = {}
    slots = asyncio.Semaphore(concurrency)
    async with MeshClient(settings) as client:

        async def on_event(msg) -> None:
            event = msgspec.json.decode(msg.data, type=TaskEvent)
            if event.kind in TERMINAL_EVENTS and event.task_id in finished:
                result.events[event.task_id] = event
                finished[event.task_id].set()

        sub = await client.bus.subscribe_core(settings.subjects.task_events, on_event)
        columns = (TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns) as progress:
            bar = progress.add_task("tasks", total=len(prompts))

            async def one(record: Record) -> None:
                async with slots:
                    task = Task(
                        id=new_task_id(), tenant=DEMO_TENANT, workflow="answer", goal=record.prompt, deadline_s=120
                    )
                    finished[task.id] = asyncio.Event()
                    await client.submit(task)
                    await asyncio.wait_for(finished[task.id].wait(), 180)
                    event = result.events[task.id]
                    if event.kind == "done" and event.artifact:
                        artifact = await client.artifact(event.artifact.id, task.tenant)
                        result.graded[task.id] = artifact.body.get("graded")
                    progress.advance(bar)

            started = time.perf_counter()
            await asyncio.gather(*(one(record) for record in prompts))
            result.wall_s = time.perf_counter() - started
        await sub.unsubscribe()
    return result


def wait_for_rows(client, task_ids: list[str], expected_calls: int, timeout_s: float = 60.0) -> None:
    """The accountant ingests asynchronously; wait until every call of the run has its row."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = client.query(
            "SELECT count() FROM usage_events FINAL WHERE task_id IN %(ids)s", parameters={"ids": task_ids}
        ).result_rows[0][0]
        if count >= expected_calls or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def report(settings: MeshSettings, prompts: list[Record], result: RunResult) -> None:
    console = Console(width=max(Console().width, 110))
    task_ids = list(result.events)
    expected_calls = sum(e.calls for e in result.events.values())
    ch = clickhouse_connect.get_client(dsn=settings.clickhouse_url)
    wait_for_rows(ch, task_ids, expected_calls)
    rows = ch.query(
        "SELECT tier, model, outcome = 'cache_hit' AS cached, count() AS calls, sum(input_tokens), "
        "sum(output_tokens), toFloat64(sum(cost_usd)) FROM usage_events FINAL WHERE task_id IN %(ids)s "
        "GROUP BY tier, model, cached ORDER BY cached, tier, model",
        parameters={"ids": task_ids},
    ).result_rows

    kinds: dict[str, int] = {}
    for event in result.events.values():
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    graded = [g for g in result.graded.values() if g is not None]
    accuracy = sum(graded) / len(prompts) if prompts else 0.0

    catalog = Catalog.load(settings.deploy_dir)
    baseline = frontier_baseline(catalog, prompts)

    table = Table(title=f"frugalmesh demo: {len(prompts)} recorded prompts (GSM8K + MMLU)")
    table.add_column("route", no_wrap=True)
    table.add_column("model (tier)", no_wrap=True)
    for column in ("calls", "tokens in", "tokens out", "USD", "accuracy"):
        table.add_column(column, justify="right")
    mesh_cost = 0.0
    mesh_in = mesh_out = mesh_calls = 0
    for tier, model, cached, calls, tokens_in, tokens_out, cost in rows:
        route = "mesh, cache hits" if cached else "mesh"
        table.add_row(route, f"{model} ({tier})", str(calls), f"{tokens_in:,}", f"{tokens_out:,}", f"{cost:.4f}", "")
        mesh_cost += cost
        mesh_in += tokens_in
        mesh_out += tokens_out
        mesh_calls += calls
    table.add_row(
        "mesh total", "", str(mesh_calls), f"{mesh_in:,}", f"{mesh_out:,}", f"{mesh_cost:.4f}", f"{accuracy:.1%}",
        style="bold",
    )
    table.add_row(
        "frontier only", f"{baseline.model} ({baseline.tier})", str(baseline.calls), f"{baseline.input_tokens:,}",
        f"{baseline.output_tokens:,}", f"{baseline.cost_usd:.4f}", f"{baseline.accuracy:.1%}", style="bold",
    )
    console.print(table)
    saving = 1 - mesh_cost / baseline.cost_usd if baseline.cost_usd else 0.0
    console.print(
        f"tasks: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} in {result.wall_s:.1f}s; "
        f"cost {saving:.1%} below frontier-only at {accuracy:.1%} vs {baseline.accuracy:.1%} accuracy."
    )
    console.print(
        'rows: frugalmesh sql "SELECT tier, model, count(), sum(cost_usd) FROM usage_events GROUP BY tier, model"'
    )
    console.print("the picture: frugalmesh report --out report.html (one HTML file; docs/analytics.md)")


def run_demo(data_dir: Path, n_tasks: int, concurrency: int, seed: int) -> None:
    prompts = sample_prompts(load_recorded_outcomes(data_dir), n_tasks, seed)
    settings = client_settings()
    if running_stack(settings.home):
        Console().print(f"using the running mesh at {settings.nats_url}")
        settings = settings.model_copy(update={"data": data_dir})
        result = asyncio.run(push_tasks(settings, prompts, concurrency))
        report(settings, prompts, result)
        return
    Console().print(f"starting the mesh (state in {settings.home})...")
    settings = settings.model_copy(update={"data": data_dir})
    with Stack(home=settings.home, nats_port=-1, clickhouse_port=0, settings=settings) as stack:
        result = asyncio.run(push_tasks(stack.settings, prompts, concurrency))
        report(stack.settings, prompts, result)
