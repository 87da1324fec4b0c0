"""`frugalmesh creds create | revoke | list | init`: the mesh's NATS identities (services/embedded/creds.py).

Each writes the identity's seed under ``<home>/creds/`` and the server's authorization file
``<home>/nats-auth.conf`` again, then asks the running `frugalmesh up` stack's nats-server(s) to read
it (a reload: connections of identities that remain are kept). For a server `up` did not start
(compose, your own), include that file in its configuration and reload it
(``nats-server --signal reload``, or ``docker compose kill -s HUP nats``).
"""

from __future__ import annotations

import click

from services.embedded.creds import CredentialStore, reload_server
from services.embedded.stack import SERVICES, SHIPPED_AGENTS, running_stack
from services.runtime.grants import PUBLIC_KEY_ENV, load_signer, signer_seed
from services.runtime.identities import Identity, inbox_prefix, public_key
from services.runtime.settings import MeshSettings

ONE_OF = "give exactly one of --tenant, --agent, --operator"


def _identity(tenant: str | None, agent: str | None, operator: str | None) -> Identity:
    given = [(kind, name) for kind, name in (("tenant", tenant), ("agent", agent), ("operator", operator)) if name]
    if len(given) != 1:
        raise click.UsageError(ONE_OF)
    kind, name = given[0]
    try:
        return Identity(kind, name)  # type: ignore[arg-type]  # one of the three literals above
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _publish_auth(store: CredentialStore, settings: MeshSettings) -> str:
    """Write the authorization file and reload the running stack's servers; what happened, in words."""
    path = store.write_auth(settings.subjects, store.home)
    state = running_stack(store.home)
    reloaded = [pid for pid in (state or {}).get("nats_pids", []) if reload_server(pid)]
    if reloaded:
        return f"the running stack's nats-server read {path} again"
    return f"wrote {path}: include it in nats-server's configuration and reload the server"


def _selector(func):
    for option in (
        click.option("--operator", help="An operator: may change caps and switches (through the accountant)."),
        click.option("--agent", help="An agent service: answers only its own subject (mesh.agent.<name>)."),
        click.option("--tenant", help="A tenant's clients: submit and read only that tenant's tasks."),
    ):
        func = option(func)
    return func


@click.group()
def creds() -> None:
    """NATS identities: one per service, operator, tenant and agent (docs/security.md)."""


@creds.command("create")
@_selector
def creds_create(tenant: str | None, agent: str | None, operator: str | None) -> None:
    """Make an identity's credential (an nkey seed file, owner-only) and let the server know it."""
    identity = _identity(tenant, agent, operator)
    settings = MeshSettings()
    store = CredentialStore(settings.home)
    try:
        path = store.create(identity)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    key = public_key(path.read_bytes())
    click.echo(f"{identity.kind} {identity.name}: {path}")
    click.echo(f"  public key {key}; replies come to {inbox_prefix(key)}.> (set it as the client's inbox prefix)")
    click.echo(f"  frugalmesh: FRUGALMESH_NATS_CREDS={path}")
    click.echo(f"  nats CLI: --nkey {path} --inbox-prefix {inbox_prefix(key)}")
    click.echo(f"  {_publish_auth(store, settings)}")


@creds.command("revoke")
@_selector
def creds_revoke(tenant: str | None, agent: str | None, operator: str | None) -> None:
    """Delete an identity's credential; the server refuses it from the reload on."""
    identity = _identity(tenant, agent, operator)
    settings = MeshSettings()
    store = CredentialStore(settings.home)
    try:
        store.revoke(identity)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {identity.kind} {identity.name}; {_publish_auth(store, settings)}")


@creds.command("init")
def creds_init() -> None:
    """Credentials for every service, the shipped agents and you (what `frugalmesh up` makes), for a
    server `up` does not start (compose)."""
    settings = MeshSettings()
    home = settings.home
    store = CredentialStore(home)
    for name, seed in store.ensure_mesh([*SERVICES, *SHIPPED_AGENTS]).items():
        click.echo(f"{name}: {seed}")
    click.echo(_publish_auth(store, settings))
    # The accountant's grant key too (made once, 0600): compose mounts it into the accountant alone.
    _, where = signer_seed(home)
    click.echo(f"grant key: {where}; for the other services, in .env: {PUBLIC_KEY_ENV}={load_signer(home).public_key}")


@creds.command("list")
def creds_list() -> None:
    """Every identity with a credential here: kind, name, public key (never a seed)."""
    store = CredentialStore(MeshSettings().home)
    credentials = store.credentials()
    if not credentials:
        click.echo(f"no credentials in {store.folder}; `frugalmesh up` or `frugalmesh creds init` makes them")
    for credential in credentials:
        click.echo(f"{credential.identity.kind:9} {credential.identity.name} {credential.public_key}")
