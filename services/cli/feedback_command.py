"""`frugalmesh feedback`: a verdict on a call's (or a task's) answer, sent to ``mesh.feedback``.

It goes to JetStream directly (``services.runtime.feedback``), like `frugalmesh kill`, so it needs
NATS, not the gateway; the accountant stores it in ClickHouse (view ``call_feedback``), where
`frugalmesh router train --from-clickhouse` reads labels from.
"""

from __future__ import annotations

import asyncio

import click

from services.runtime.settings import MeshSettings


@click.command()
@click.option("--call", "call_id", default="", help="The judged call: the x-frugalmesh-call-id header.")
@click.option("--task", "task_id", default="", help="The judged task (each of its calls), when no --call is given.")
@click.option("--correct/--incorrect", default=None, help="The answer was right (score 1) or wrong (score 0).")
@click.option("--score", type=click.FloatRange(0, 1), help="How good the answer was, 0 to 1.")
@click.option(
    "--source",
    type=click.Choice(["user", "validator", "judge", "label"]),
    default="user",
    show_default=True,
    help="Who judged.",
)
@click.option("--tenant", default="default", show_default=True, help="The tenant whose call it was.")
@click.option("--tag", default="", help="What the call was about; default: the task's workflow.")
@click.option("--comment", default="")
def feedback(
    call_id: str,
    task_id: str,
    correct: bool | None,
    score: float | None,
    source: str,
    tenant: str,
    tag: str,
    comment: str,
) -> None:
    """Send a verdict on an answer: `frugalmesh feedback --call <id> --correct`."""
    from services.cli.client import MeshClient
    from services.embedded.stack import client_settings
    from services.runtime.feedback import new_feedback, publish_feedback

    if (score is None) == (correct is None):
        raise click.UsageError("give exactly one of --correct/--incorrect and --score 0..1")
    try:
        verdict = new_feedback(
            tenant=tenant,
            score=score if score is not None else float(bool(correct)),
            source=source,  # type: ignore[arg-type]  # click.Choice has checked it
            call_id=call_id,
            task_id=task_id,
            tag=tag,
            comment=comment,
        )
    except ValueError as exc:
        raise click.UsageError(f"{exc} (--call <x-frugalmesh-call-id> or --task <task id>)") from None
    settings: MeshSettings = client_settings()

    async def send() -> None:
        async with MeshClient(settings) as client:
            await client.bus.declare_streams()
            await publish_feedback(client.bus, verdict)

    try:
        asyncio.run(send())
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"feedback {verdict.feedback_id}: score {verdict.score:g} on {call_id or f'task {task_id}'}")
