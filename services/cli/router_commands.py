"""`frugalmesh router train|split` and `frugalmesh eval routing`: build routers from recorded
outcomes and judge them through the router's own code (docs/routing.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import click

from services.runtime.catalog import Catalog
from services.runtime.settings import REPO_DEPLOY_DIR

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
@data_option
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The router file to write (.npz)."
)
@click.option(
    "--policy",
    "policy",
    type=click.Choice(["learned", "cascade", "all"]),
    default="all",
    show_default=True,
    help="learned: the prompt model; cascade: the answer validator (needs <weak>_response columns).",
)
@click.option("--weak", default=DEFAULT_WEAK, show_default=True, help="Catalogue name of the cheaper model.")
@click.option("--strong", default=DEFAULT_STRONG, show_default=True, help="Catalogue name of the strong model.")
@click.option(
    "--target", default=0.95, show_default=True, help="Calibrate to this share of the strong model's accuracy."
)
@click.option("--seed", default=0, show_default=True)
@deploy_option
def train(
    data: Path,
    out: Path,
    policy: Literal["learned", "cascade", "all"],  # click.Choice has checked it
    weak: str,
    strong: str,
    target: float,
    seed: int,
    deploy_dir: Path,
) -> None:
    """Train on every CSV in --data and write the router file."""
    from services.router_training.dataset import load_outcomes
    from services.router_training.training import PolicyName
    from services.router_training.training import train as train_router

    catalog = Catalog.load(deploy_dir)
    catalog.model(weak), catalog.model(strong)
    records = load_outcomes(data)
    policies: list[PolicyName] = ["learned", "cascade"] if policy == "all" else [policy]
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
@click.option("--seed", default=0, show_default=True)
def split(data: Path, out: Path, by: str, test_share: float, seed: int) -> None:
    """Split recorded outcomes into a training and a held-out set (contaminated prompts dropped)."""
    from services.router_training.dataset import split_outcomes

    counts = split_outcomes(data, out, "files" if by == "files" else "rows", test_share, seed)
    click.echo(f"train {counts['train']} prompts in {out / 'train'}, test {counts['test']} prompts in {out / 'test'}")


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
@deploy_option
def routing(router_path: Path, data: Path, target: float, as_json: bool, plot: Path | None, deploy_dir: Path) -> None:
    """Replay every prompt in --data through the router's policies; cost and accuracy per policy."""
    from rich.console import Console
    from rich.table import Table

    from services.router_training.dataset import load_outcomes
    from services.router_training.evaluate import evaluate
    from services.router_training.evaluate import plot as draw
    from services.routing.policies.routerfile import RouterFile
    from services.routing.table import RoutingTable

    evaluation = evaluate(
        load_outcomes(data),
        RouterFile.load(router_path),
        RoutingTable.load(deploy_dir),
        Catalog.load(deploy_dir),
        target,
    )
    if plot:
        draw(evaluation, plot, f"{data.name}: cost vs quality")
    if as_json:
        for result in evaluation.results:
            click.echo(json.dumps(result.as_dict()))
        return
    first = evaluation.results[0]
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
        table.add_column(column, justify="left" if column == "policy" else "right")
    for r in evaluation.results:
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
