"""The NATS identities of one mesh: their seeds under ``<home>/creds/`` and the server's
``authorization`` block made from them (``<dir>/nats-auth.conf``), which nats-server re-reads on a
reload signal.

`frugalmesh up` makes one identity per service process, one per shipped agent and one for the
operator who runs it (their login name); `frugalmesh creds create` adds tenants, agents and more
operators, and `frugalmesh creds revoke` removes one. Every seed stays in ``<home>/creds/`` (0600,
the folder 0700): the operator hands a tenant's or an agent's file to whoever runs it. The
authorization file holds public keys and permissions only, no secret.

Permissions are written for one subject prefix (the mesh's), so an auth file serves one mesh; the
rules themselves are services/runtime/identities.py's.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from schemas.subjects import Subjects
from services.runtime.identities import (
    SEED_SUFFIX,
    Credential,
    Identity,
    new_seed,
    operator_name,
    permissions,
    write_seed,
)

CREDS_DIR = "creds"
AUTH_FILE = "nats-auth.conf"
AGENT_PROCESS = "agent-"  # an agent's process name: agent-<agent name>
# The key under which ``ensure_mesh`` returns the seed of the operator running it.
OPERATOR = "operator"


def process_identity(name: str) -> Identity:
    """The NATS identity of a mesh process: a service's, or an agent's (``agent-<name>``)."""
    if name.startswith(AGENT_PROCESS):
        return Identity("agent", name.removeprefix(AGENT_PROCESS))
    return Identity("service", name)


@dataclass(frozen=True)
class CredentialStore:
    home: Path

    @property
    def folder(self) -> Path:
        return self.home / CREDS_DIR

    def path(self, identity: Identity) -> Path:
        return self.folder / identity.file_name

    def ensure(self, identity: Identity) -> Path:
        """The seed file of ``identity``, made now if it has none (an existing one is kept)."""
        path = self.path(identity)
        if not path.exists():
            write_seed(path, new_seed())
        return path

    def ensure_mesh(self, processes: list[str]) -> dict[str, Path]:
        """The seed of each process (``process_identity``) and, under ``OPERATOR``, of the operator
        running this (their login name): what `frugalmesh up` and `creds init` make."""
        seeds = {name: self.ensure(process_identity(name)) for name in processes}
        seeds[OPERATOR] = self.ensure(Identity("operator", operator_name(None)))
        return seeds

    def create(self, identity: Identity) -> Path:
        """A new identity's seed file; ValueError if it exists (revoke it first to make a new key)."""
        if self.path(identity).exists():
            raise ValueError(
                f"{identity.kind} {identity.name!r} already has a credential ({self.path(identity)}); "
                f"`frugalmesh creds revoke --{identity.kind} {identity.name}` first to replace it"
            )
        return self.ensure(identity)

    def revoke(self, identity: Identity) -> None:
        path = self.path(identity)
        if not path.exists():
            raise ValueError(f"{identity.kind} {identity.name!r} has no credential in {self.folder}")
        path.unlink()

    def credentials(self) -> list[Credential]:
        if not self.folder.is_dir():
            return []
        return [Credential.load(path) for path in sorted(self.folder.glob(f"*{SEED_SUFFIX}"))]

    def authorization(self, subjects: Subjects) -> dict:
        """nats-server's ``authorization`` block: every identity's public key and permissions."""
        users = []
        for credential in self.credentials():
            public = credential.public_key
            users.append({"nkey": public, "permissions": permissions(credential.identity, subjects, public)})
        return {"authorization": {"users": users}}

    def write_auth(self, subjects: Subjects, folder: Path) -> Path:
        """``<folder>/nats-auth.conf`` (JSON, which nats-server's configuration syntax reads), owner-only."""
        path = folder / AUTH_FILE
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(self.authorization(subjects), file, indent=1)
        return path


def reload_server(pid: int) -> bool:
    """Ask a running nats-server to read its configuration again (its identities among it); False when
    there is no such process."""
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return False
    return True
