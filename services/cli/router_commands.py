"""`frugalmesh router train|split` and `frugalmesh eval routing`: build routers from recorded
outcomes and judge them through the router's own code (docs/routing.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import click

from services.cli.router_versions import rollback, train_from_clickhouse, versions
from services.runtime.catalog import Catalog
from services.runtime.settings import REPO_DEPLOY_DIR

if TYPE_CHECKING:
    from services.router_training.evaluate import PolicyResult

DEFAULT_WEAK = "mixtral-8x7b-local"
DEFAULT_STRONG = "gpt-4-1106-preview"

deploy_option = click.option(
    "--deploy-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=REPO_DEPLOY_DIR,
    show_default=True,
    help="Where models.toml (prices) and routing.toml (rules) are read from.",
)
data_option = click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A routing-format CSV, or a directory whose CSVs (recursively) are all read.",
)


def _column(catalog: Catalog, model: str) -> str:
    """The CSV column holding ``model``'s outcomes: its catalogue ``recorded_as``, else its name."""
    spec = catalog.models.get(model)
    return spec.recorded_as if spec is not None and spec.recorded_as else model


@click.group()
def router() -> None:
    """Train routing policies from recorded outcomes."""


@router.command()
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    help="A routing-format CSV, or a directory whose CSVs (recursively) are all read.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The router file to write (.npz); with --from-clickhouse, the live file routing.toml names.",
)
@click.option(
    "--policy",
    "policy",
    type=click.Choice(["learned", "cascade", "all"]),
    default="all",
    show_default=True,
    help="learned: the prompt model; cascade: the answer validator (needs <weak>_response columns); "
    "all: what the data supports (the cascade is skipped, with the reason, without answer columns).",
)
@click.option("--weak", default=DEFAULT_WEAK, show_default=True, help="Catalogue name of the cheaper model.")
@click.option("--strong", default=DEFAULT_STRONG, show_default=True, help="Catalogue name of the strong model.")
@click.option(
    "--target", default=0.95, show_default=True, help="Calibrate to this share of the strong model's accuracy."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--from-clickhouse",
    is_flag=True,
    help="Add the labels the mesh collected (view call_feedback) to --base's, and publish the result as the "
    "next version of --out (kept as OUT.vNNNN.npz; the router picks it up without a restart).",
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="--from-clickhouse: the router file trained offline (--data) that the labels are added to.",
)
@click.option("--tenant", help="--from-clickhouse: only this tenant's labels.")
@click.option("--database", help="--from-clickhouse: the ClickHouse database (default: the URL's).")
@deploy_option
def train(
    data: Path | None,
    out: Path,
    policy: Literal["learned", "cascade", "all"],  # click.Choice has checked it
    weak: str,
    strong: str,
    target: float,
    seed: int,
    from_clickhouse: bool,
    base: Path | None,
    tenant: str | None,
    database: str | None,
    deploy_dir: Path,
) -> None:
    """Train on every CSV in --data and write the router file; or, with --from-clickhouse, add the
    mesh's own labels to a trained file and publish a new version."""
    if from_clickhouse:
        if base is None or data is not None:
            raise click.UsageError("--from-clickhouse takes --base <router file trained with --data>, and no --data")
        train_from_clickhouse(base, out, tenant, database, target)
        return
    if data is None:
        raise click.UsageError("give --data <CSV or directory>, or --from-clickhouse --base <router file>")
    from services.router_training.dataset import load_outcomes
    from services.router_training.training import PolicyName, trainable_policies
    from services.router_training.training import train as train_router

    catalog = Catalog.load(deploy_dir)
    catalog.model(weak), catalog.model(strong)
    records = load_outcomes(data)
    policies: list[PolicyName] = [policy] if policy != "all" else []
    if policy == "all":
        policies, skipped = trainable_policies(records, _column(catalog, weak))
        if skipped:
            click.echo(skipped)
    try:
        router_file = train_router(
            records,
            weak_model=weak,
            strong_model=strong,
            weak_column=_column(catalog, weak),
            strong_column=_column(catalog, strong),
            policies=policies,
            target=target,
            seed=seed,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    router_file.save(out)
    click.echo(
        f"trained on {sum(router_file.trained_on.values())} prompts "
        f"from {len(router_file.trained_on)} file(s); wrote {out}"
    )
    for name, model in (("learned", router_file.prompt_model), ("cascade", router_file.answer_model)):
        if model is not None:
            point = model.calibration
            click.echo(
                f"  {name}: threshold {point.threshold:.4f}, on training data (out-of-fold) {point.weak_share:.1%} "
                f"kept weak at accuracy {point.accuracy:.3f} = {point.accuracy / point.strong_accuracy:.1%} of strong"
            )
    prompt_model = router_file.prompt_model
    if prompt_model is not None and prompt_model.random_weak_share is not None:
        verdict = "did not beat" if prompt_model.routes_at_random else "beat"
        click.echo(
            f"  learned: its scores {verdict} random routing on held-out folds, which keeps "
            f"{prompt_model.random_weak_share:.1%} weak at the target on every fold"
            + ("; it routes that share weak at random" if prompt_model.routes_at_random else "")
        )


@router.command()
@click.option("--data", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Writes OUT/train and OUT/test."
)
@click.option(
    "--by",
    type=click.Choice(["rows", "files"]),
    default="files",
    show_default=True,
    help="files: hold out whole files (domains); a file alone in its folder is split by rows.",
)
@click.option("--test-share", default=0.3, show_default=True)
@click.option(
    "--tune-share",
    default=0.0,
    show_default=True,
    help="Also write OUT/tune: a held-out side for design choices, so OUT/test stays a final hold-out.",
)
@click.option("--seed", default=0, show_default=True)
def split(data: Path, out: Path, by: str, test_share: float, tune_share: float, seed: int) -> None:
    """Split recorded outcomes into a training and a held-out set (contaminated prompts dropped)."""
    from services.router_training.dataset import split_outcomes

    try:
        counts = split_outcomes(data, out, "files" if by == "files" else "rows", test_share, seed, tune_share)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(", ".join(f"{side} {count} prompts in {out / side}" for side, count in counts.items()))


router.add_command(versions)
router.add_command(rollback)


@click.group(name="eval")
def eval_group() -> None:
    """Judge the mesh on recorded outcomes."""


@eval_group.command()
@click.option("--router", "router_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@data_option
@click.option("--target", default=0.95, show_default=True, help="Quality target: share of the strong model's accuracy.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per policy, one per line.")
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path), help="Draw the cost-quality curves to this PNG."
)
@click.option(
    "--online",
    is_flag=True,
    help="Replay --data as traffic in a seeded random order through the online policy, which starts from "
    "--router and learns from shadowed calls; judged on the stream's last --window (docs/routing.md).",
)
@click.option(
    "--feedback-share", default=0.1, show_default=True, help="--online: the most calls shadowed (and so labelled)."
)
@click.option("--retrain-every", default=100, show_default=True, help="--online: calls between two retrains.")
@click.option("--window", default=0.5, show_default=True, help="--online: the judged share at the stream's end.")
@click.option("--seed", default=0, show_default=True, help="--online: the order the prompts arrive in.")
@deploy_option
def routing(
    router_path: Path,
    data: Path,
    target: float,
    as_json: bool,
    plot: Path | None,
    online: bool,
    feedback_share: float,
    retrain_every: int,
    window: float,
    seed: int,
    deploy_dir: Path,
) -> None:
    """Replay every prompt in --data through the router's policies; cost and accuracy per policy."""
    from services.router_training.dataset import load_outcomes
    from services.router_training.evaluate import evaluate
    from services.router_training.evaluate import plot as draw
    from services.router_training.online_eval import evaluate_online, plot_online
    from services.routing.policies.online import OnlineSettings
    from services.routing.policies.routerfile import RouterFile
    from services.routing.table import RoutingTable

    records, router_file = load_outcomes(data), RouterFile.load(router_path)
    table, catalog = RoutingTable.load(deploy_dir), Catalog.load(deploy_dir)
    if not online:
        evaluation = evaluate(records, router_file, table, catalog, target)
        if plot:
            draw(evaluation, plot, f"{data.name}: cost vs quality")
        _print_results(evaluation.results, target, as_json)
        return
    try:
        settings = OnlineSettings(target=target, shadow_share=feedback_share, retrain_every=retrain_every)
        online_evaluation = evaluate_online(
            records, router_file, table, catalog, settings, seed=seed, window_share=window
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if plot:
        plot_online(online_evaluation, str(plot), f"{data.name}: online routing, seed {seed}")
    _print_results(online_evaluation.results, target, as_json)
    if not as_json:
        result = online_evaluation.online
        click.echo(
            f"online, last {result.n} of {result.stream_n} calls: {result.shadow_calls} shadowed, "
            f"shadow cost ${result.shadow_cost_usd:.4f} (in its cost); "
            f"whole stream {result.stream_shadow_share:.1%} shadowed"
        )


def _print_results(results: Sequence[PolicyResult], target: float, as_json: bool) -> None:
    if as_json:
        for result in results:
            click.echo(json.dumps(result.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    first = results[0]
    table = Table(
        title=f"{first.n} prompts; strong model {first.strong_accuracy:.3f}, weak {first.weak_accuracy:.3f}; "
        f"target {target:.0%} of strong = {target * first.strong_accuracy:.3f}"
    )
    for column in (
        "policy",
        "strong share",
        "accuracy",
        "cost USD",
        "cost reduction",
        "meets target",
        "best at target",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right", no_wrap=column == "policy")
    for r in results:
        table.add_row(
            r.policy,
            f"{r.strong_share:.1%}",
            f"{r.accuracy:.3f}",
            f"{r.cost_usd:.4f}",
            f"{r.cost_reduction:.1%}",
            "yes" if r.meets_target else "no",
            f"{r.best_cost_reduction_at_target:.1%}",
        )
    Console().print(table)
