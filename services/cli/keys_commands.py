"""`frugalmesh keys create|list|revoke`: the gateway's virtual keys (services/gateway/keys.py).

The keys live in a KV bucket, so these commands write and read it over the Bus themselves: no
service needs to run but NATS. The one exception is a key's own caps (``--day`` / ``--month``):
they are the accountant's (a ``BudgetUpdate`` with scope ``key`` on ``mesh.operator.<name>.budget``), and they
are set *before* the key is stored, under the id the key will get. So a key created with caps is
never usable without them: when the accountant does not answer or refuses, no key is created
(caps set for an id no key ever gets cost nothing).

``--policy`` is stored with the key, and the gateway sends it with each ``frugalmesh/auto`` call of the
key: the router picks the model with it instead of the tenant's (or workflow's) policy in
deploy/routing.toml. A call that names a model is pinned to it, whatever the key's policy.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
import msgspec

from schemas.messages import BudgetState, BudgetUpdate, VirtualKey
from schemas.subjects import OPERATOR_BUDGET
from services.runtime.settings import MeshSettings

if TYPE_CHECKING:
    from services.cli.client import MeshClient
    from services.runtime.catalog import Catalog

REQUEST_TIMEOUT_S = 5.0


def _settings() -> MeshSettings:
    from services.embedded.stack import client_settings

    return client_settings()


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except ConnectionError as exc:  # MeshClient says what it could not reach and how to start it
        raise click.ClickException(str(exc)) from None


def _when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
def keys() -> None:
    """Virtual keys of the OpenAI-compatible gateway: each maps to a tenant, caps and an allow-list."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant its calls belong to (caps, pacing, kill switch).")
@click.option("--name", default="", help="A label for people, e.g. ci-bot.")
@click.option("--allow-model", "allow_models", multiple=True, help="The only models it may use (repeatable).")
@click.option(
    "--policy", help="Routing policy for its frugalmesh/auto calls: rules, learned, cascade or fixed:<model>."
)
@click.option("--day", "day_usd", type=click.FloatRange(min=0), help="The key's own cap per UTC day, USD.")
@click.option("--month", "month_usd", type=click.FloatRange(min=0), help="The key's own cap per UTC month, USD.")
@click.option("--json", "as_json", is_flag=True, help="Print the key and its secret as JSON.")
def keys_create(
    tenant: str,
    name: str,
    allow_models: tuple[str, ...],
    policy: str | None,
    day_usd: float | None,
    month_usd: float | None,
    as_json: bool,
) -> None:
    """Create a key; its secret is printed once and stored nowhere (only its sha256)."""
    from schemas.subjects import token
    from services.gateway.keys import new_key_id
    from services.runtime.catalog import Catalog

    try:
        token(tenant)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tenant") from None
    settings = _settings()
    catalog = Catalog.load(settings.deploy_dir)
    unknown = [m for m in allow_models if m not in catalog.models]
    if unknown:
        known = ", ".join(sorted(catalog.models))
        message = f"not in the catalogue: {', '.join(unknown)} (known: {known})"
        raise click.BadParameter(message, param_hint="--allow-model")
    if policy is not None:
        _check_policy(policy, catalog)
    key_id = new_key_id()
    secret, key = _run(_create(settings, tenant, name, list(allow_models), policy, day_usd, month_usd, key_id))
    if as_json:
        caps_json = {"day_usd": day_usd, "month_usd": month_usd}
        click.echo(json.dumps({"secret": secret, **msgspec.to_builtins(key), **caps_json}))
        return
    caps = ", ".join(f"{w} ${v:g}" for w, v in (("day", day_usd), ("month", month_usd)) if v is not None)
    click.echo(f"key {key.id}  tenant {key.tenant}" + (f"  name {key.name}" if key.name else ""))
    if key.allow_models:
        click.echo(f"allowed models: {', '.join(key.allow_models)}")
    if caps:
        click.echo(f"caps: {caps} (budget scope key {key.id})")
    if policy:
        click.echo(f"policy {policy}: routes its frugalmesh/auto calls (instead of the tenant's, routing.toml)")
    click.echo("secret (shown once, stored only as its sha256):")
    click.echo(secret)


def _check_policy(policy: str, catalog: Catalog) -> None:
    from services.routing.policies import CASCADE, FIXED_PREFIX, LEARNED, RULES

    fixed = policy.removeprefix(FIXED_PREFIX) if policy.startswith(FIXED_PREFIX) else None
    if policy not in (RULES, LEARNED, CASCADE) and (fixed is None or fixed not in catalog.models):
        message = f"{policy!r} is not a policy: rules, learned, cascade or fixed:<catalogue model>"
        raise click.BadParameter(message, param_hint="--policy")


async def _create(
    settings: MeshSettings,
    tenant: str,
    name: str,
    allow_models: list[str],
    policy: str | None,
    day_usd: float | None,
    month_usd: float | None,
    key_id: str,
) -> tuple[str, VirtualKey]:
    from services.cli.client import MeshClient
    from services.gateway.keys import KeyStore

    async with MeshClient(settings) as client:
        if day_usd is not None or month_usd is not None:
            await _set_caps(client, key_id, day_usd, month_usd)
        store = await KeyStore.open(client.bus)
        return await store.create(
            tenant, name=name, allow_models=allow_models, policy=policy, by=getpass.getuser(), key_id=key_id
        )


async def _set_caps(client: MeshClient, key_id: str, day_usd: float | None, month_usd: float | None) -> None:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from services.cli.budget_commands import operator_subject
    from services.runtime.bus import Rejected

    update = BudgetUpdate(scope="key", key=key_id, day_usd=day_usd, month_usd=month_usd)
    subject = operator_subject(client.settings, OPERATOR_BUDGET)
    try:
        state = await client.bus.request(subject, update, BudgetState, REQUEST_TIMEOUT_S)
    except (NoRespondersError, NatsTimeout):
        raise click.ClickException(
            f"no answer from the accountant on {subject}, so the key's caps could not be set and no key was "
            "created; start it (`frugalmesh up` or `frugalmesh run accountant`), or create the key without "
            "--day/--month"
        ) from None
    except Rejected as exc:
        raise click.ClickException(f"the accountant refused the key's caps ({exc}); no key was created") from None
    if state.error:
        raise click.ClickException(f"the accountant refused the key's caps ({state.error}); no key was created")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key (never a secret).")
def keys_list(as_json: bool) -> None:
    """Every key, live and revoked (ids, never secrets)."""
    found = _run(_list(_settings()))
    if as_json:
        for key in found:
            click.echo(msgspec.json.encode(key).decode())
        return
    rows = [("id", "tenant", "name", "models", "policy", "created", "revoked")]
    for k in found:
        models = ",".join(k.allow_models) if k.allow_models else "*"
        rows.append((k.id, k.tenant, k.name or "-", models, k.policy or "-", _when(k.created_ms), _when(k.revoked_ms)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


async def _list(settings: MeshSettings) -> list[VirtualKey]:
    from services.cli.client import MeshClient
    from services.gateway.keys import KeyStore

    async with MeshClient(settings) as client:
        return await (await KeyStore.open(client.bus)).list()


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (fmk_...): every gateway refuses it within a second."""
    from services.cli.client import MeshClient
    from services.gateway.keys import KeyStore

    async def revoke() -> VirtualKey:
        async with MeshClient(_settings()) as client:
            return await (await KeyStore.open(client.bus)).revoke(key_id)

    try:
        key = _run(revoke())
    except LookupError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    click.echo(f"revoked {key.id} (tenant {key.tenant}) at {_when(key.revoked_ms)}")
