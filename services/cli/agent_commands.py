"""`frugalmesh agent run module:attribute` (one instance of an agent) and `frugalmesh agents` (the live ones).

``agent run`` reads the mesh's settings as `frugalmesh run <service>` does and runs the instance in
the foreground; run it again, here or on another machine, to scale the agent out (its instances
share one queue group). The current folder is searched first for the module, as uvicorn does, so an
agent written next to where the command runs needs no install.

``agents`` asks NATS's service framework, not a registry of the mesh's own: every live instance of
this mesh's agents answers ``$SRV.STATS`` (services/runtime/agents.py), and the listing groups them
by agent with what they measured (requests served, failed and in flight; mean cost and latency) and
what their authors declared.
"""

from __future__ import annotations

import asyncio
import sys
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

import click
import msgspec

if TYPE_CHECKING:
    from frugalmesh.agents import Agent
    from services.runtime.agents import AgentInstance

TARGET_HINT = "MODULE:ATTRIBUTE"
EXAMPLE = "frugalmesh.agents.shipped.debate:agent"


def load_agent(target: str) -> Agent:
    """The ``Agent`` that ``module:attribute`` names; click.BadParameter (exit code 2) saying what is wrong."""
    from frugalmesh.agents import Agent

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{target!r} is not {TARGET_HINT}, e.g. {EXAMPLE}", param_hint=TARGET_HINT)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r} ({exc}): run from the folder that holds it, put that folder on "
            "PYTHONPATH, or pip install its package",
            param_hint=TARGET_HINT,
        ) from None
    except Exception as exc:  # the module itself failed: a syntax error, a bad Agent declaration
        raise click.BadParameter(f"importing {module_name!r} failed: {exc!r}", param_hint=TARGET_HINT) from None
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            agents = sorted(name for name, value in vars(module).items() if isinstance(value, Agent))
            listed = f"; its agents: {', '.join(agents)}" if agents else "; it defines no Agent"
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attribute!r}{listed}", param_hint=TARGET_HINT
            )
        found = getattr(found, part)
    if not isinstance(found, Agent):
        raise click.BadParameter(
            f"{target} is a {type(found).__name__}, not a frugalmesh.agents.Agent", param_hint=TARGET_HINT
        )
    return found


@click.group("agent")
def agent_group() -> None:
    """Agent services: run an instance of one."""


@agent_group.command("run")
@click.argument("target", metavar=TARGET_HINT)
@click.option("--ready-file", type=click.Path(path_type=Path), help="Touched once the agent takes requests.")
def agent_run(target: str, ready_file: Path | None) -> None:
    """Run one instance of the agent MODULE:ATTRIBUTE names (e.g. frugalmesh.agents.shipped.debate:agent)."""
    from services.runtime.settings import MeshSettings

    agent = load_agent(target)
    try:
        app = agent.app(MeshSettings())
    except ValueError as exc:  # no handler
        raise click.BadParameter(str(exc), param_hint=TARGET_HINT) from None
    if ready_file:

        @app.after_startup
        async def announce_ready() -> None:
            ready_file.write_text(agent.name)

    asyncio.run(app.run())


class AgentListing(msgspec.Struct, kw_only=True):
    """One agent of the mesh, as `frugalmesh agents --json` prints it: its instances taken together."""

    name: str
    instances: list[dict[str, str]]  # id, version, started
    consumes: list[str]
    produces: list[str]
    served: int
    failed: int
    in_flight: int
    mean_cost_usd: float | None  # measured; None until a request was served
    mean_latency_s: float | None
    declared: dict[str, float]  # cost_usd, latency_s, success_rate where the agent declares them


def listing(instances: list[AgentInstance]) -> list[AgentListing]:
    """The live instances grouped by agent name, in name order."""
    by_name: dict[str, list[AgentInstance]] = {}
    for instance in instances:
        by_name.setdefault(instance.name, []).append(instance)
    agents = []
    for name, group in sorted(by_name.items()):
        served = sum(i.stats.served for i in group)
        first = group[0]
        declared = {"cost_usd": first.cost_usd, "latency_s": first.latency_s, "success_rate": first.success_rate}
        agents.append(
            AgentListing(
                name=name,
                instances=[{"id": i.id, "version": i.version, "started": i.started} for i in group],
                consumes=list(dict.fromkeys(t for i in group for t in i.consumes)),
                produces=list(dict.fromkeys(t for i in group for t in i.produces)),
                served=served,
                failed=sum(i.stats.served - i.stats.succeeded for i in group),
                in_flight=sum(i.stats.in_flight for i in group),
                mean_cost_usd=sum(i.stats.cost_usd for i in group) / served if served else None,
                mean_latency_s=sum(i.stats.busy_s for i in group) / served if served else None,
                declared={key: value for key, value in declared.items() if value is not None},
            )
        )
    return agents


async def _live() -> tuple[str, list[AgentListing]]:
    from services.cli.client import MeshClient
    from services.embedded.stack import client_settings
    from services.runtime.agents import agent_instances

    settings = client_settings()
    async with MeshClient(settings) as client:
        return settings.subject_prefix, listing(await agent_instances(client.bus))


@click.command("agents")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def agents(as_json: bool) -> None:
    """List the live agents of this mesh: instances, artifact types, requests and their mean cost and latency."""
    try:
        prefix, live = asyncio.run(_live())
    except ConnectionError as exc:  # MeshClient says what it could not reach and how to start it
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(msgspec.json.encode(live).decode())
        return
    if not live:
        click.echo(f"no live agents on mesh {prefix!r}; start one with `frugalmesh agent run {TARGET_HINT}`")
        return
    header = ("agent", "instances", "versions", "consumes", "produces", "served", "failed", "in flight")
    rows = [(*header, "mean $", "mean s", "declared")]
    for a in live:
        declared = " ".join(f"{key}={value:g}" for key, value in a.declared.items()) or "-"
        rows.append(
            (
                a.name,
                str(len(a.instances)),
                ",".join(sorted({i["version"] for i in a.instances})),
                ",".join(a.consumes) or "-",
                ",".join(a.produces) or "-",
                str(a.served),
                str(a.failed),
                str(a.in_flight),
                "-" if a.mean_cost_usd is None else f"{a.mean_cost_usd:.6f}",
                "-" if a.mean_latency_s is None else f"{a.mean_latency_s:.2f}",
                declared,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
