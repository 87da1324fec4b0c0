"""Who is who on the bus: one NATS identity per service, operator, tenant and agent, and what each
may publish and subscribe to.

An identity is an nkey user of nats-server (``authorization { users = [{nkey, permissions}] }``):
the server holds only its public key and its permissions; the process holds the seed, in a file
readable by its owner only (``FRUGALMESH_NATS_CREDS``, a bare ``SU...`` seed that any NATS client
reads: ``nats --nkey FILE``, nats.js's ``nkeyAuthenticator``). The file's name says whose it is,
``<kind>.<name>.nk``, as `frugalmesh creds create` writes it; the server never trusts that name, it
only checks what the key may do.

Decisions:
- nkey users in the server's configuration rather than JWT accounts: one account serves the mesh,
  whose subjects already carry the tenant, so every rule is a subject; the price is a configuration
  reload when an identity is added or revoked (services/embedded/creds.py writes the file and
  signals the server).
- What an action is "by" comes from the subject the server let it publish on, never from the body:
  a tenant submits on ``<prefix>.task.submit.<tenant>`` and puts and gets artifacts on
  ``<prefix>.artifact.{put,get}.<tenant>``; an operator changes switches and caps on
  ``<prefix>.operator.<name>.{kill,budget}``, which only the accountant serves and records.
- Replies come to ``_INBOX.<public key>.>`` (the connection's inbox prefix), the only inboxes an
  identity may subscribe to: nobody reads another's replies.
- Services are trusted with the mesh's subjects, but for the state the accountant alone writes
  (``_protected``: the ledger journal and snapshot, budgets, the control bucket's switches and
  pace, the leader lease, alert claims, the events of record on ``<prefix>.control.>``) and the
  operators' subjects. Nobody but the server publishes JetStream's advisories (``$JS.EVENT.>``:
  a forged MAX_DELIVERIES advisory would end a running task) or system subjects.
- Streams: a stream's configuration is its creator's, and a ``RePublish`` in it makes the server
  write where the creator may not publish. So JetStream's API is read-only to all but the accountant
  (``JETSTREAM_READS``: stream and message reads, consumers), a service may also create the mesh's
  own streams and buckets when missing (``creatable_streams``), and nobody else creates or changes
  one (``stream_rights``: what a process then declares at start; the rest waits for its creator).
- An operator publishes on an allow-list (task submissions, artifact puts and gets, feedback, agent
  and step requests, budget queries, benchmarks' echo, its own operator subjects, gateway keys,
  schedules, JetStream's reads, ``$SRV``), so it changes a cap or a switch only through the
  accountant, which records who and when; it may read everything.
- An agent subscribes only to its own subject and the service framework's (``$SRV``) subjects with
  its name; it answers requests (``allow_responses``) and may put and get any tenant's artifacts,
  since it serves the request's tenant, which the request names.
- A tenant may only submit its own tasks, send feedback, put and get its own artifacts, read its
  own tasks' events (live, and the stored ending through JetStream's direct get by subject).
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import nkeys
from faststream.nats.security import NatsNKey
from faststream.security import BaseSecurity

from schemas.subjects import (
    BUCKET_ACCOUNTANT_LEASE,
    BUCKET_ALERTS_FIRED,
    BUCKET_ARTIFACT_BODIES,
    BUCKET_ARTIFACT_INDEX,
    BUCKET_ATTEMPTS,
    BUCKET_BUDGETS,
    BUCKET_CONTROL,
    BUCKET_KEYS,
    BUCKET_LEDGER,
    BUCKET_RESPONSE_CACHE,
    BUCKET_SCHEDULES,
    BUCKET_TASK_CALLS,
    INBOX,
    JS_ACK,
    JS_API,
    JS_EVENT,
    JS_FLOW_CONTROL,
    KV_API,
    OBJECT_STORE_API,
    SRV_API,
    STREAM_CONTROL,
    STREAM_LEDGER,
    STREAM_TASK_EVENTS,
    STREAM_TASKS,
    Subjects,
    direct_get,
    token,
)
from services.runtime.streams import stream_configs

# admin: every right (the tests' session identity; `frugalmesh creds` makes none).
Kind = Literal["service", "operator", "tenant", "agent", "admin"]
KINDS: tuple[Kind, ...] = ("service", "operator", "tenant", "agent", "admin")
SEED_SUFFIX = ".nk"
# The one service that writes the protected state.
ACCOUNTANT = "accountant"
# The system account's subjects: no client of the mesh's account publishes there.
SYSTEM = "$SYS.>"


@dataclass(frozen=True)
class Identity:
    kind: Kind
    name: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"no identity kind {self.kind!r}: use one of {', '.join(KINDS)}")
        token(self.name)

    @property
    def file_name(self) -> str:
        return f"{self.kind}.{self.name}{SEED_SUFFIX}"

    @classmethod
    def of_file(cls, path: Path) -> Identity:
        """Whose seed ``path`` holds, from its name (``<kind>.<name>.nk``); ValueError if it says none."""
        kind, _, name = path.name.removesuffix(SEED_SUFFIX).partition(".")
        if not path.name.endswith(SEED_SUFFIX) or kind not in KINDS or not name:
            raise ValueError(
                f"cannot tell whose credential {path} is: `frugalmesh creds create` names them <kind>.<name>.nk "
                f"(kind one of {', '.join(KINDS)})"
            )
        return cls(cast(Kind, kind), name)


def new_seed() -> bytes:
    """A fresh user nkey seed (``SU...``)."""
    return cast(bytes, nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    return cast(bytes, nkeys.from_seed(bytearray(seed.strip())).public_key).decode()


def inbox_prefix(public: str) -> str:
    """Where an identity's replies come: the only inboxes it may subscribe to."""
    return f"{INBOX}.{public}"


# JetStream's API as every service and operator may use it: read streams and buckets, run consumers.
JETSTREAM_READS = (
    f"{JS_API}.INFO",
    f"{JS_API}.STREAM.INFO.>",
    f"{JS_API}.STREAM.NAMES",
    f"{JS_API}.STREAM.LIST",
    f"{JS_API}.STREAM.MSG.GET.>",
    f"{JS_API}.DIRECT.GET.>",
    f"{JS_API}.CONSUMER.>",
    f"{JS_FLOW_CONTROL}.>",  # a push consumer's flow-control answers (KV watches, ordered consumers)
)
# Buckets a service may create when missing (the accountant's own are PROTECTED_BUCKETS).
SERVICE_BUCKETS = (
    BUCKET_RESPONSE_CACHE,
    BUCKET_ARTIFACT_INDEX,
    BUCKET_SCHEDULES,
    BUCKET_ATTEMPTS,
    BUCKET_KEYS,
    BUCKET_TASK_CALLS,
)
PROTECTED_BUCKETS = (BUCKET_BUDGETS, BUCKET_CONTROL, BUCKET_ACCOUNTANT_LEASE, BUCKET_ALERTS_FIRED)


def creatable_streams(subjects: Subjects) -> set[str]:
    """The streams a service other than the accountant may create when they are missing: the mesh's (but
    the control stream) and those under its buckets (but the accountant's). A stream's configuration is
    its creator's, and one that republishes (``RePublish``) makes the server write where its creator may
    not publish: so nobody creates another stream, and nobody but the accountant changes one."""
    streams = {config.name for config in stream_configs(subjects) if config.name}
    streams.discard(subjects.stream(STREAM_CONTROL))
    return (
        streams
        | {f"KV_{subjects.bucket(name)}" for name in SERVICE_BUCKETS}
        | {f"OBJ_{subjects.bucket(BUCKET_ARTIFACT_BODIES)}"}
    )


def stream_rights(creds: Path | None, subjects: Subjects) -> tuple[set[str] | None, bool]:
    """Which of the mesh's streams (and buckets) a process with this credential creates when they are
    missing (None: any; else these names: its own, ``creatable_streams``, for a service, none for anyone
    else, who waits for them) and whether it brings an existing one to this version's configuration
    (only the accountant, an admin, or a process without a credential, on a server without authorization)."""
    identity = Identity.of_file(creds) if creds else None
    if identity is None or identity.kind == "admin" or identity == Identity("service", ACCOUNTANT):
        return None, True
    return (creatable_streams(subjects) if identity.kind == "service" else set()), False


def _protected(subjects: Subjects) -> list[str]:
    """What only the accountant writes: the subjects, and the JetStream calls that would change them."""
    buckets = [subjects.bucket(name) for name in PROTECTED_BUCKETS]
    ledger = subjects.bucket(BUCKET_LEDGER)  # the ledger's snapshot (an object store)
    writes = [
        subjects.ledger,
        f"{subjects.prefix}.control.>",
        *(f"{KV_API}.{bucket}.>" for bucket in buckets),
        f"{OBJECT_STORE_API}.{ledger}.>",
    ]
    streams = [
        subjects.stream(STREAM_LEDGER),
        subjects.stream(STREAM_CONTROL),
        *(f"KV_{bucket}" for bucket in buckets),
        f"OBJ_{ledger}",
    ]
    calls = ("STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE", "STREAM.MSG.DELETE")
    return writes + [f"{JS_API}.{call}.{stream}" for call in calls for stream in streams]


def permissions(identity: Identity, subjects: Subjects, public: str) -> dict[str, Any]:
    """nats-server's ``permissions`` block for ``identity`` (see the module docstring)."""
    p = subjects.prefix
    never = [f"{JS_EVENT}.>", SYSTEM]
    operators = f"{p}.operator.>"
    if identity.kind == "admin":
        return {"publish": {"allow": [">"], "deny": never}, "subscribe": {"allow": [">"]}}
    if identity.kind == "service" and identity.name == ACCOUNTANT:
        return {"publish": {"allow": [">"], "deny": [*never, operators]}, "subscribe": {"allow": [">"]}}
    if identity.kind == "service":
        allow = [
            f"{p}.>",
            f"{KV_API}.>",
            f"{OBJECT_STORE_API}.>",
            f"{JS_ACK}.>",
            f"{INBOX}.>",
            f"{SRV_API}.>",
            *JETSTREAM_READS,
            *(f"{JS_API}.STREAM.CREATE.{name}" for name in sorted(creatable_streams(subjects))),
            # the planner deletes a task past its deliveries; an object store put over a name purges it
            f"{JS_API}.STREAM.MSG.DELETE.{subjects.stream(STREAM_TASKS)}",
            f"{JS_API}.STREAM.PURGE.OBJ_{subjects.bucket(BUCKET_ARTIFACT_BODIES)}",
        ]
        deny = [*never, operators, *_protected(subjects)]
        return {"publish": {"allow": allow, "deny": deny}, "subscribe": {"allow": [">"]}}
    inbox = f"{inbox_prefix(public)}.>"
    if identity.kind == "operator":
        allow = [
            subjects.task_submit_all,
            subjects.artifact_put("*"),
            subjects.artifact_get("*"),
            f"{p}.feedback.>",
            f"{p}.agent.>",
            f"{p}.step.request",
            f"{p}.budget.show",
            f"{p}.bench.>",
            subjects.operator(identity.name, "*"),
            f"{KV_API}.{subjects.bucket(BUCKET_KEYS)}.>",
            f"{KV_API}.{subjects.bucket(BUCKET_SCHEDULES)}.>",
            *JETSTREAM_READS,
            f"{JS_ACK}.>",
            f"{SRV_API}.>",
        ]
        return {
            "publish": {"allow": allow, "deny": [*never, *_protected(subjects)]},
            # An operator may read everything on the bus: it is the one who runs it. It answers requests it
            # serves (a benchmark's echo, a test peer) on the requester's inbox.
            "subscribe": {"allow": [">"]},
            "allow_responses": True,
        }
    if identity.kind == "tenant":
        tenant = identity.name
        events = subjects.task_events_of_tenant(tenant)
        allow = [
            subjects.task_submit(tenant),
            subjects.feedback(tenant),
            subjects.artifact_put(tenant),
            subjects.artifact_get(tenant),
            direct_get(subjects.stream(STREAM_TASK_EVENTS), events),
        ]
        return {"publish": {"allow": allow}, "subscribe": {"allow": [events, inbox]}}
    agent = identity.name
    return {
        "publish": {
            "allow": [
                subjects.artifact_put("*"),
                subjects.artifact_get("*"),
                subjects.step_request,
                subjects.dlq(f"agent-{agent}"),
            ]
        },
        "subscribe": {
            "allow": [
                subjects.agent(agent),
                f"{SRV_API}.*",
                f"{SRV_API}.*.{agent}",
                f"{SRV_API}.*.{agent}.*",
                inbox,
            ]
        },
        "allow_responses": True,
    }


@dataclass(frozen=True)
class Credential:
    """A seed file (the process's) and whose it is."""

    path: Path
    identity: Identity

    @classmethod
    def load(cls, path: Path) -> Credential:
        identity = Identity.of_file(path)
        if not path.is_file():
            raise ValueError(f"no NATS credential at {path}: create one with `frugalmesh creds create`")
        return cls(path, identity)

    @property
    def public_key(self) -> str:
        return public_key(self.path.read_bytes())


def tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The client's TLS context: the CA that signed the server's certificate, and this client's own
    certificate when the server asks for one (mutual TLS); None when no TLS setting is made."""
    if ca is None and cert is None:
        return None
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def broker_options(creds: Path | None, tls: ssl.SSLContext | None) -> dict[str, Any]:
    """``connect_options`` as FastStream's NatsBroker takes them (the seed and TLS as its ``security``)."""
    options = connect_options(creds, tls)
    seed, tls = options.pop("nkeys_seed", None), options.pop("tls", None)
    if seed:
        options["security"] = NatsNKey(seed, ssl_context=tls)
    elif tls:
        options["security"] = BaseSecurity(ssl_context=tls)
    return options


def connect_options(creds: Path | None, tls: ssl.SSLContext | None) -> dict[str, Any]:
    """nats-py ``connect`` keywords for an identity (its seed and its own inboxes) and TLS."""
    options: dict[str, Any] = {}
    if creds is not None:
        credential = Credential.load(creds)
        options.update(nkeys_seed=str(credential.path), inbox_prefix=inbox_prefix(credential.public_key))
    if tls is not None:
        options["tls"] = tls
    return options


def operator_name(creds: Path | None) -> str:
    """The name an operator's changes go out under (``<prefix>.operator.<name>``): the credential's, which
    the server checks; without a credential (a server without authorization), the login name."""
    if creds is not None:
        identity = Identity.of_file(creds)
        if identity.kind not in ("operator", "admin"):
            raise ValueError(
                f"{creds} is {identity.kind} {identity.name!r}'s credential: changing caps and switches takes an "
                "operator's (`frugalmesh creds create --operator NAME`)"
            )
        return identity.name
    login = re.sub(r"[^A-Za-z0-9_\-]", "_", getpass.getuser())
    return login or "operator"


def write_seed(path: Path, seed: bytes) -> None:
    """The seed, readable by its owner only (created so: never briefly readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(seed)
