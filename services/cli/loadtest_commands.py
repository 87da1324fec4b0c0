"""`frugalmesh loadtest`: replay recorded traffic into a mesh, and record a mesh's traffic.

``replay`` runs against the mesh of a running `frugalmesh up` when there is one. Otherwise it
starts its own stack (embedded NATS and ClickHouse unless NATS_URL / CLICKHOUSE_URL name running
ones, and the services) on a temporary deploy directory whose providers use the synthetic
backend with a latency model (deploy/loadtest/models.toml, see loadtest/deploy.py), so recorded
sizes can be served without spending anything.

A gateway recording (``FRUGALMESH_GATEWAY_RECORD``) goes over HTTP to ``--gateway``, else to the
running stack's gateway (both with ``--key``), else to that of a stack this command starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import nats.errors

from loadtest.gateway_replay import GatewayReplayOptions
from loadtest.gateway_report import GatewayReport
from loadtest.gateway_traffic import GatewayTraffic
from loadtest.replay import ReplayOptions, Report
from services.cli.options import NON_NEGATIVE, POSITIVE


@click.group()
def loadtest() -> None:
    """Load-test the mesh with recorded traffic."""


@loadtest.command("replay")
@click.argument("trace")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object (progress goes to stderr).")
@click.option("--speed", type=POSITIVE, default=1.0, show_default=True, help="Arrival times are divided by this.")
@click.option(
    "--duration", "duration_s", type=NON_NEGATIVE, help="Replay only the rows of the first S recorded seconds."
)
@click.option("--limit", type=click.IntRange(min=1), help="Replay only the first N rows.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("loadtest-report.json"), show_default=True)
@click.option("--tenant", default="loadtest", show_default=True, help="For rows that do not name one.")
@click.option("--workflow", default="answer", show_default=True, help="For rows that do not name one.")
@click.option(
    "--deadline",
    "deadline_s",
    type=POSITIVE,
    default=300.0,
    show_default=True,
    help="Each task's deadline (gateway recordings: each request's time-out), seconds.",
)
@click.option("--salt", default="", help="Changes every prompt, so a rerun does not hit the earlier run's cache.")
@click.option(
    "--data", type=click.Path(path_type=Path), help="Data directory holding traces/ [FRUGALMESH_DATA or the cache]."
)
@click.option(
    "--deploy",
    "deploy_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help=(
        "Deploy directory for the stack this command starts "
        "[deploy/loadtest/models.toml + deploy/ routing and workflows]."
    ),
)
@click.option("--gateway", help="Gateway recordings: the gateway to replay against (http://host:port).")
@click.option("--key", envvar="FRUGALMESH_KEY", help="Gateway recordings: that gateway's key [FRUGALMESH_KEY].")
@click.option(
    "--clickhouse", envvar="CLICKHOUSE_URL", help="Gateway recordings: where usage rows are checked [the stack's]."
)
def replay_command(
    trace: str,
    as_json: bool,
    speed: float,
    duration_s: float | None,
    limit: int | None,
    out: Path,
    tenant: str,
    workflow: str,
    deadline_s: float,
    salt: str,
    data: Path | None,
    deploy_dir: Path | None,
    gateway: str | None,
    key: str | None,
    clickhouse: str | None,
) -> None:
    """Send TRACE's requests at their recorded times and report latency, spend and loss.

    TRACE: azure-conv, azure-code, mooncake-conversation, mooncake-synthetic, or a file (an Azure
    CSV, a Mooncake JSONL, a recording from `frugalmesh loadtest record`: published as tasks; or a
    gateway recording, FRUGALMESH_GATEWAY_RECORD: sent to a gateway as chat completions).
    """
    from loadtest.gateway_traffic import is_gateway_recording, read_gateway_recording
    from loadtest.replay import replay
    from loadtest.traces import read_trace, resolve_trace
    from services.embedded.stack import client_settings, running_stack
    from services.runtime.data import DataNotFound

    report: Report | GatewayReport
    try:
        path = resolve_trace(trace, data)
        if is_gateway_recording(path):
            traffic = read_gateway_recording(path, limit=limit, duration_s=duration_s)
            if not traffic.requests:
                raise click.ClickException(f"{trace}: no requests to replay (skipped: {traffic.skipped or 'none'})")
            gateway_options = GatewayReplayOptions(speed=speed, timeout_s=deadline_s, salt=salt)
            report = _replay_gateway(traffic, gateway_options, gateway, key, clickhouse, deploy_dir, as_json)
            _finish(report, trace, out, as_json)  # exits
        if gateway:
            raise click.ClickException(
                f"--gateway replays gateway recordings (FRUGALMESH_GATEWAY_RECORD); {trace} is a trace of sizes, "
                "replayed as tasks into the mesh: leave --gateway out"
            )
        rows = read_trace(path, limit=limit, duration_s=duration_s)
    except (FileNotFoundError, DataNotFound, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if not rows:
        raise click.ClickException(f"{trace}: no rows to replay")
    options = ReplayOptions(speed=speed, tenant=tenant, workflow=workflow, deadline_s=deadline_s, salt=salt)
    settings = client_settings()
    if running_stack(settings.home):
        if deploy_dir:
            raise click.ClickException("--deploy applies to a stack this command starts; a mesh is already running")
        click.echo(f"replaying {len(rows)} rows into the running mesh at {settings.nats_url}", err=True)
        report = _progress(lambda tick: replay(settings, rows, options, on_tick=tick), len(rows), as_json)
    else:
        with _own_stack(settings, deploy_dir) as stack:
            mesh = stack.settings
            report = _progress(lambda tick: replay(mesh, rows, options, on_tick=tick), len(rows), as_json)
    _finish(report, trace, out, as_json)


@contextlib.contextmanager
def _own_stack(settings, deploy_dir: Path | None) -> Iterator[Any]:
    """A stack on the load-test deploy directory (or ``deploy_dir``), in a temporary home."""
    from loadtest.deploy import loadtest_deploy_dir
    from services.embedded.servers import EmbeddedError
    from services.embedded.stack import Stack

    with tempfile.TemporaryDirectory(prefix="frugalmesh-loadtest-") as tmp:
        deploy = deploy_dir or loadtest_deploy_dir(Path(tmp) / "deploy")
        home = Path(tmp) / "home"
        stack_settings = settings.model_copy(update={"deploy_dir": deploy, "home": home})
        click.echo(f"starting a stack on {deploy} (state in {home})...", err=True)
        try:
            with Stack(home=home, nats_port=-1, clickhouse_port=0, settings=stack_settings, local_engine=None) as stack:
                yield stack
        except EmbeddedError as exc:
            raise click.ClickException(str(exc)) from None


def _replay_gateway(
    traffic: GatewayTraffic,
    options: GatewayReplayOptions,
    gateway: str | None,
    key: str | None,
    clickhouse_url: str | None,
    deploy_dir: Path | None,
    as_json: bool,
) -> GatewayReport:
    from loadtest.gateway_replay import replay_gateway
    from services.embedded.stack import client_settings, development_key, running_stack

    settings = client_settings()
    state = running_stack(settings.home) or {}
    if clickhouse_url is None and state and gateway in (None, state.get("gateway_url")):
        clickhouse_url = settings.clickhouse_url
    gateway = gateway or state.get("gateway_url")
    n = len(traffic.requests)
    if gateway:
        if deploy_dir:
            raise click.ClickException("--deploy applies to a stack this command starts; the gateway is running")
        if not key:
            raise click.ClickException(f"{gateway} needs a key: --key or FRUGALMESH_KEY (see `keys create`)")
        click.echo(f"replaying {n} requests against {gateway}", err=True)
        return _progress(lambda tick: replay_gateway(gateway, key, traffic, options, clickhouse_url, tick), n, as_json)
    with _own_stack(settings, deploy_dir) as stack:
        secret = development_key(stack.settings) or key
        if not secret:
            raise click.ClickException("the stack's NATS holds keys already: pass one with --key or FRUGALMESH_KEY")
        url, clickhouse = stack.gateway_url, stack.settings.clickhouse_url
        options.recorded_output = True  # the synthetic backend writes max_tokens of text: the recorded length
        click.echo(f"replaying {n} requests against {url}", err=True)
        return _progress(lambda tick: replay_gateway(url, secret, traffic, options, clickhouse, tick), n, as_json)


def _progress(run: Callable[[Callable[[Any], None]], Coroutine[Any, Any, Any]], total: int, as_json: bool) -> Any:
    """``run(tick)`` under a progress bar; ``tick`` takes the replay's live counts (``finished``, ``line()``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=as_json)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("", total=total)

        def tick(live: Any) -> None:
            progress.update(bar, completed=live.finished, description=live.line())

        return asyncio.run(run(tick))


def _finish(report: Report | GatewayReport, trace: str, out: Path, as_json: bool) -> NoReturn:
    """Write and print the report; exit 1 unless the zero-loss check held."""
    from loadtest.gateway_report import print_gateway_report

    out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(report.to_json()))
    elif isinstance(report, GatewayReport):
        print_gateway_report(report, trace)
    else:
        print_report(report, trace)
    if not as_json:
        click.echo(f"report: {out}")
    sys.exit(0 if report.zero_loss.ok else 1)


def print_report(report: Report, trace: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"loadtest replay: {trace}")
    table.add_column("figure")
    for column in ("p50", "p95", "p99", "max"):
        table.add_column(column, justify="right")
    for name, p in (
        ("end-to-end latency, ms", report.e2e_latency_ms),
        ("mesh overhead, ms", report.mesh_overhead_ms),
        ("backend time, ms", report.backend_ms),
    ):
        table.add_row(name, *(f"{v:.1f}" if v is not None else "-" for v in (p.p50, p.p95, p.p99, p.max)))
    console.print(table)
    outcomes = ", ".join(f"{n} {kind}" for kind, n in report.outcomes.items() if n)
    console.print(
        f"{report.published} tasks published of {report.rows} rows ({report.publish_errors} publish errors, "
        f"{report.skipped_oversize} too large for a message): {outcomes or 'none ended'}"
    )
    for reason, n in report.not_done_reasons.items():
        console.print(f"  {n} x {reason}", markup=False)
    console.print(
        f"throughput {report.throughput_tasks_per_s:.1f} tasks/s (offered {report.offered_tasks_per_s:.1f}/s) "
        f"over {report.wall_s:.1f}s; {report.calls} calls, cache-hit share {report.cache_hit_share:.1%}, "
        f"prompt tokens cached by the engines {report.cached_input_share:.1%}, "
        f"spend ${report.spend_usd:.4f}"
    )
    z = report.zero_loss
    verdict = "[green]zero loss[/green]" if z.ok else "[red]LOSS[/red]"
    console.print(
        f"{verdict}: {z.ended}/{z.published} tasks ended ({z.missing} missing); "
        f"{z.usage_rows} usage rows for {z.calls_reported} calls reported "
        f"({z.tasks_with_row_mismatch} tasks with a mismatch"
        + (f", e.g. {', '.join(z.mismatched_tasks)})" if z.mismatched_tasks else ")")
    )


@loadtest.command("record")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The recording (JSONL) to write.")
@click.option("--duration", "duration_s", type=POSITIVE, help="Seconds to record [until Ctrl-C].")
@click.option(
    "--grace",
    "grace_s",
    type=NON_NEGATIVE,
    default=30.0,
    show_default=True,
    help="Seconds to wait for recorded tasks to end.",
)
def record_command(out: Path, duration_s: float | None, grace_s: float) -> None:
    """Tap a running mesh's tasks and usage into a recording that `loadtest replay` reads."""
    from loadtest.record import Recorder
    from services.embedded.stack import client_settings

    recorder = Recorder(client_settings())

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        click.echo(
            f"recording {recorder.settings.nats_url} ({recorder.settings.subject_prefix}.*); Ctrl-C stops", err=True
        )
        await recorder.record(duration_s, stop, grace_s)

    try:
        asyncio.run(go())
    except (nats.errors.NoServersError, OSError) as exc:
        raise click.ClickException(f"cannot reach NATS: {exc}; is the mesh running (`frugalmesh up`)?") from None
    click.echo(f"{recorder.write(out)} tasks recorded to {out}")
