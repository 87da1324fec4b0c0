"""The `frugalmesh` command."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import click

from services.cli.options import POSITIVE
from services.registry import SERVICES


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group()
def cli() -> None:
    """frugalmesh: a cost-governed multi-agent mesh over NATS."""


@cli.command()
@click.argument("service", type=click.Choice(list(SERVICES)))
@click.option("--ready-file", type=click.Path(path_type=Path), help="Touched once the service takes work.")
def run(service: str, ready_file: Path | None) -> None:
    """Run one service in the foreground (start more copies to scale it out)."""
    from services.registry import create_app
    from services.runtime.settings import MeshSettings

    # The gateway says where it listens (its port may be picked at start): the ready file carries it.
    urls: list[str] = []
    options = {"listening": urls.append} if service == "gateway" else {}
    app = create_app(service, MeshSettings(), **options)
    if ready_file:

        @app.after_startup
        async def announce_ready() -> None:
            # Written whole, then renamed: a reader never sees the file half written.
            partial = ready_file.with_name(ready_file.name + ".partial")
            partial.write_text("\n".join(urls))
            partial.replace(ready_file)

    asyncio.run(app.run())


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Where nats-server and ClickHouse keep their data [~/.frugalmesh].",
)
@click.option("--nats-port", default=4222, show_default=True, help="-1 picks a free port.")
@click.option(
    "--cluster",
    "nats_cluster",
    type=click.IntRange(min=0),
    default=0,
    help="Start a JetStream cluster of this many nats-server nodes (3: replication 3; --nats-port the "
    "first node's port) instead of one server.",
)
@click.option("--clickhouse-port", default=8123, show_default=True, help="0 picks a free port.")
@click.option(
    "--gateway-port",
    type=int,
    help="The OpenAI-compatible gateway's port [FRUGALMESH_GATEWAY_PORT or 4080]; 0 picks a free port.",
)
@click.option(
    "--local-engine",
    type=click.Choice(["cpu", "vllm", "none"]),
    default="cpu",
    show_default=True,
    help="The local model engine to start: cpu (SmolLM2-135M on llama.cpp), vllm (`vllm serve --model`, "
    "GPU hosts) or none. FRUGALMESH_LOCAL_ENGINE_URL names a running one instead.",
)
@click.option(
    "--model",
    "local_model",
    default="",
    help="What the local engine serves: a GGUF file (cpu) or a Hugging Face id or path (vllm).",
)
def up(
    data_dir: Path | None,
    nats_port: int,
    nats_cluster: int,
    clickhouse_port: int,
    gateway_port: int | None,
    local_engine: Literal["cpu", "vllm", "none"],  # click.Choice has checked it
    local_model: str,
) -> None:
    """Start nats-server, ClickHouse, a local model engine, the seven services and the debate agent on this
    machine; Ctrl-C stops all."""
    from services.embedded.creds import OPERATOR
    from services.embedded.servers import EmbeddedError
    from services.embedded.stack import Stack, development_key, running_stack
    from services.runtime.settings import MeshSettings

    settings = MeshSettings()
    home = data_dir or settings.home
    if running_stack(home):
        _fail(f"a stack is already running from {home} (see {home / 'stack.json'}); stop it with Ctrl-C first")
    stack = Stack(
        home=home,
        nats_port=nats_port,
        clickhouse_port=clickhouse_port,
        gateway_port=settings.gateway_port if gateway_port is None else gateway_port,
        settings=settings,
        local_engine=None if local_engine == "none" else local_engine,
        local_model=local_model,
        nats_cluster=nats_cluster,
    )
    try:
        stack.start()
    except EmbeddedError as exc:
        stack.stop()
        _fail(f"{exc}\nIf a port is taken, pass --nats-port -1 / --clickhouse-port 0 / --gateway-port 0 for free ones.")
    started = f"  (cluster of {nats_cluster}, replicas {stack.settings.replicas})" if stack.cluster else ""
    if not (stack.nats or stack.cluster):
        started = "  (external)"
    click.echo(f"NATS        {stack.settings.nats_url}{started}")
    if stack.creds:
        yours = stack.creds[OPERATOR]
        click.echo(f"Identities  {yours.parent}  (one per process; you: {yours.name}; `frugalmesh creds`)")
    click.echo(f"ClickHouse  {_redact(stack.settings.clickhouse_url)}" + ("" if stack.clickhouse else "  (external)"))
    if stack.settings.local_engine_url:
        served = (
            f"  ({stack.engine.kind}, log {home / 'logs'}/engine-{stack.engine.kind}.log)"
            if stack.engine
            else "  (external)"
        )
        click.echo(f"Local model {stack.settings.local_engine_url}{served}")
    for name, process in stack.services.items():
        click.echo(f"{name:<16}pid {process.pid}  log {home / 'logs' / name}.log")
    click.echo(f"Gateway     {stack.gateway_url}/v1  (OpenAI-compatible: base_url for any OpenAI client)")
    secret = development_key(stack.settings)
    if secret:
        click.echo(f"Dev key     {secret}  (tenant default; shown once: `frugalmesh keys create` makes more)")
    click.echo("frugalmesh is up. Ctrl-C stops everything.")
    stopping = False

    def request_stop(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stopping:
            dead = stack.dead_services()
            if dead:
                click.echo(f"service(s) exited: {', '.join(dead)}; stopping", err=True)
                break
            time.sleep(0.2)
    finally:
        click.echo("stopping...")
        stack.stop()
        click.echo("stopped.")


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@cli.command()
@click.argument("goal")
@click.option("--workflow", default="answer", show_default=True)
@click.option("--tenant", default="default", show_default=True)
@click.option("--budget", "budget_usd", type=POSITIVE, help="Budget for the task, USD.")
@click.option("--deadline", "deadline_s", type=POSITIVE, default=60.0, show_default=True, help="Seconds.")
@click.option("--allow-model", "allow_models", multiple=True, help="Pin the task to these models (repeatable).")
@click.option(
    "--item",
    "items",
    multiple=True,
    help="A task input (a `text` artifact), e.g. one ticket for `triage` (repeatable).",
)
@click.option("--items-file", type=click.File("r"), help="Task inputs, one per non-empty line (`-` reads stdin).")
def submit(
    goal: str,
    workflow: str,
    tenant: str,
    budget_usd: float | None,
    deadline_s: float,
    allow_models: tuple[str, ...],
    items: tuple[str, ...],
    items_file,
) -> None:
    """Publish a task and follow its events to the end."""
    from schemas.messages import Artifact, Task
    from services.cli.client import MeshClient, new_task_id
    from services.embedded.stack import client_settings
    from services.runtime.bus import now_ms

    texts = list(items) + ([line.strip() for line in items_file if line.strip()] if items_file else [])
    task = Task(
        id=new_task_id(),
        tenant=tenant,
        workflow=workflow,
        goal=goal,
        budget_usd=budget_usd,
        deadline_s=deadline_s,
        allow_models=list(allow_models) or None,
    )

    async def go() -> str:
        async with MeshClient(client_settings()) as client:
            for text in texts:
                artifact = Artifact(
                    type="text",
                    tenant=task.tenant,
                    task_id=task.id,
                    step_id="input",
                    body={"text": text},
                    created_ms=now_ms(),
                )
                task.inputs.append(await client.put_artifact(artifact))
            follow = await client.follow(task, timeout_s=deadline_s + 10)
            await client.submit(task)
            click.echo(f"task {task.id}")
            final = None
            async for event in follow:
                step = f" [{event.step_id}]" if event.step_id else ""
                detail = f" {event.detail}" if event.detail else ""
                click.echo(f"  {event.kind}{step}{detail}  (${event.cost_usd:.6f}, {event.calls} calls)")
                final = event
            if final is None:  # follow yields until the terminal event or raises TimeoutError
                raise TimeoutError(f"no events for task {task.id}")
            if final.artifact:
                artifact = await client.artifact(final.artifact.id, task.tenant)
                click.echo(f"\n{artifact.body.get('text', artifact.body)}")
            return final.kind

    try:
        kind = asyncio.run(go())
    except (ConnectionError, TimeoutError) as exc:
        _fail(str(exc) or "timed out waiting for the task's events; is the mesh running (`frugalmesh up`)?")
    except ValueError as exc:
        _fail(str(exc))
    sys.exit(0 if kind == "done" else 1)


@cli.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "tsv"]), default="table", show_default=True)
@click.option(
    "--write",
    is_flag=True,
    help="Run as the writer (the accountant's user, CLICKHOUSE_URL), for INSERT, ALTER, DROP and other "
    "changes. Without it the query runs as the read-only analyst, and ClickHouse refuses any change.",
)
def sql(query: str, fmt: str, write: bool) -> None:
    """Query ClickHouse, e.g. frugalmesh sql "SELECT model, sum(cost_usd) FROM usage_events GROUP BY model"."""
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError
    from rich.console import Console
    from rich.table import Table

    from services.embedded.servers import EmbeddedError
    from services.embedded.stack import clickhouse_for_queries, client_settings

    settings = client_settings()
    try:
        with clickhouse_for_queries(settings, write=write) as target:
            try:
                client = clickhouse_connect.get_client(dsn=target.url)
                result = client.query(query, settings={"readonly": 1} if target.readonly else None)
            except ClickHouseError as exc:
                _fail(_sql_error(exc, write))
            except Exception as exc:  # connection refused and friends
                _fail(f"cannot query ClickHouse at {_redact(target.url)}: {exc}. Is the mesh up (`frugalmesh up`)?")
    except EmbeddedError as exc:  # no writer's credentials for --write; a stopped stack's server did not start
        _fail(str(exc))
    if fmt == "tsv":
        click.echo("\t".join(result.column_names))
        for row in result.result_rows:
            click.echo("\t".join(str(v) for v in row))
        return
    table = Table(*result.column_names)
    for row in result.result_rows:
        table.add_row(*(str(v) for v in row))
    Console().print(table)


def _sql_error(exc: Exception, write: bool) -> str:
    """ClickHouse's own message (``Code: N. DB::Exception: ...``) rather than the driver's wrapping; a
    change refused to the read-only user says how to make it."""
    text = str(exc)
    message = text[text.find("Code: ") :] if "Code: " in text else text
    message = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    refused = any(code in message for code in ("(READONLY)", "(ACCESS_DENIED)"))
    if refused and not write:
        message += (
            "\nfrugalmesh sql runs as the read-only analyst user; to change data, pass --write "
            "(runs as the writer, the accountant's user)"
        )
    return message


@cli.command()
@click.option("--tasks", "n_tasks", default=300, show_default=True, help="How many recorded prompts to send.")
@click.option("--data", type=click.Path(path_type=Path), help="Recorded data directory [FRUGALMESH_DATA or the cache].")
@click.option("--concurrency", default=32, show_default=True)
@click.option("--seed", default=7, show_default=True)
def demo(n_tasks: int, data: Path | None, concurrency: int, seed: int) -> None:
    """Push recorded GSM8K and MMLU prompts through the mesh and compare with frontier-only."""
    from services.cli.demo import run_demo
    from services.runtime.data import DataNotFound, resolve_data_dir

    try:
        data_dir = resolve_data_dir(data)
    except DataNotFound as exc:
        _fail(str(exc))
    run_demo(data_dir, n_tasks=n_tasks, concurrency=concurrency, seed=seed)


@cli.group()
def schemas() -> None:
    """The wire schemas."""


@schemas.command("export")
@click.option("--check", is_flag=True, help="Fail if schemas/json is stale instead of writing it.")
def schemas_export(check: bool) -> None:
    """Write a JSON Schema per message into schemas/json/."""
    from schemas.export import JSON_DIR, export, render

    if check:
        stale = [
            name
            for name, text in render().items()
            if not (JSON_DIR / name).is_file() or (JSON_DIR / name).read_text() != text
        ]
        if stale:
            _fail(f"stale JSON Schemas: {', '.join(stale)}; run `frugalmesh schemas export`")
        click.echo("schemas/json is up to date")
        return
    for path in export():
        click.echo(path)


@cli.group()
def data() -> None:
    """The recorded public data sets."""


@data.command("fetch")
@click.option(
    "--dest", type=click.Path(path_type=Path), help="Where to put the files [FRUGALMESH_DATA if set, else the cache]."
)
@click.option("--mirror", help="Base URL of a mirror with the same layout as the sources [FRUGALMESH_DATA_MIRROR].")
def data_fetch(dest: Path | None, mirror: str | None) -> None:
    """Download the public data sets (RouteLLM outcomes, Azure and Mooncake traces), verified by sha256."""
    from services.datafetch.fetch import fetch_command

    sys.exit(fetch_command(dest, mirror))


def _register_command_modules() -> None:
    """Commands that live beside the service they drive."""
    from services.cli.agent_commands import agent_group, agents
    from services.cli.budget_commands import budget, clear, kill
    from services.cli.creds_commands import creds
    from services.cli.estimate_command import estimate
    from services.cli.experiment_commands import experiment
    from services.cli.feedback_command import feedback
    from services.cli.keys_commands import keys
    from services.cli.loadtest_commands import loadtest
    from services.cli.report_command import report
    from services.cli.router_commands import eval_group, router
    from services.cli.schedule_commands import schedule
    from services.cli.schema_commands import schema
    from services.cli.tco_command import tco

    for command in (budget, kill, clear, estimate, schedule, loadtest, router, eval_group, keys, agent_group, agents):
        cli.add_command(command)
    cli.add_command(report)
    cli.add_command(creds)
    cli.add_command(schema)
    cli.add_command(feedback)
    cli.add_command(tco)
    cli.add_command(experiment)


_register_command_modules()

if __name__ == "__main__":
    cli()
