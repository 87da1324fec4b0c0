"""NATS identities and subject permissions on a real nats-server (docs/security.md, item 1).

A server of the module's own runs with the authorization `frugalmesh up` writes (services/embedded/
creds.py) for one prefix: services, two operators, two tenants and two agents. Each refused row of
docs/security.md is a publish or subscription the server refuses (nats-py reports the server's
"permissions violation" to the connection's error callback; the refused request itself only times
out); each allowed row is one that goes through. The mesh's own services then run on that server,
each with its own credential, to show who an action is by comes from the subject the credential may
use: a tenant's task, artifact and events, an operator's switch and cap change recorded in ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
import trustme
from helpers import new_task
from nats.js.api import RePublish, StreamConfig

from schemas.messages import (
    Artifact,
    ArtifactGet,
    ArtifactReply,
    BudgetQuery,
    BudgetState,
    BudgetUpdate,
    DeadLetter,
    KillSwitch,
)
from schemas.subjects import (
    BUCKET_BUDGETS,
    BUCKET_CONTROL,
    BUCKET_RESPONSE_CACHE,
    JS_EVENT,
    KV_API,
    OPERATOR_BUDGET,
    OPERATOR_KILL,
    STREAM_CONTROL,
    STREAM_DLQ,
    STREAM_TASK_EVENTS,
    STREAM_USAGE,
    Subjects,
    direct_get,
)
from services.embedded.creds import CredentialStore
from services.embedded.servers import EmbeddedNats
from services.runtime.bus import Bus, now_ms
from services.runtime.identities import Identity
from services.runtime.settings import MeshSettings

pytestmark = pytest.mark.infra

PREFIX = "idt" + uuid.uuid4().hex[:6]
SUBJECTS = Subjects(PREFIX)
IDENTITIES = [
    *(Identity("service", name) for name in ("accountant", "router", "planner", "artifact-store")),
    Identity("operator", "alice"),
    Identity("operator", "bob"),
    Identity("tenant", "acme"),
    Identity("tenant", "globex"),
    Identity("agent", "echo"),
    Identity("agent", "other"),
]
REFUSED_S = 0.5  # how long a refused publish or subscription takes to come back as an error


class Secured:
    """The module's server and every identity's seed file."""

    def __init__(self, url: str, store: CredentialStore) -> None:
        self.url = url
        self.store = store

    def creds(self, kind: str, name: str) -> Path:
        return self.store.path(Identity(kind, name))  # type: ignore[arg-type]

    def settings(self, base: MeshSettings, kind: str, name: str) -> MeshSettings:
        return base.model_copy(
            update={"nats_url": self.url, "nats_creds": self.creds(kind, name), "subject_prefix": PREFIX}
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> AsyncIterator[Secured]:
    home = tmp_path_factory.mktemp("secured")
    store = CredentialStore(home)
    for identity in IDENTITIES:
        store.ensure(identity)
    server = EmbeddedNats(home / "nats", port=-1, auth_file=store.write_auth(SUBJECTS, home))
    server.start()
    yield Secured(server.url, store)
    server.stop()


class Client:
    """A nats-py connection as one identity that keeps the server's errors (its refusals)."""

    def __init__(self, nc: nats.NATS, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def refused(self, what: str) -> bool:
        """Whether the server refused ``what`` (a subject) to this connection by now."""
        deadline = time.monotonic() + REFUSED_S * 4
        while time.monotonic() < deadline:
            if any(what.lower() in error for error in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


@contextlib.asynccontextmanager
async def connected(secured: Secured, kind: str, name: str) -> AsyncIterator[Client]:
    errors: list[str] = []

    async def keep(error: Exception) -> None:
        errors.append(str(error).lower())

    settings = MeshSettings(nats_url=secured.url, nats_creds=secured.creds(kind, name))
    nc = await nats.connect(secured.url, error_cb=keep, max_reconnect_attempts=0, **settings.nats_options())
    try:
        yield Client(nc, errors)
    finally:
        await nc.close()


async def refused_publishes(client: Client, subjects: list[str]) -> list[str]:
    """The subjects of ``subjects`` the server refused to let ``client`` publish on."""
    for subject in subjects:
        await client.nc.publish(subject, b"{}")
    await client.nc.flush()
    return [subject for subject in subjects if await client.refused(f'publish to "{subject}"')]


async def refused_subscriptions(client: Client, subjects: list[str]) -> list[str]:
    for subject in subjects:
        await client.nc.subscribe(subject)
    await client.nc.flush()
    return [subject for subject in subjects if await client.refused(f'subscription to "{subject}"')]


# -- who gets in --


async def test_nobody_connects_without_a_known_key(secured, tmp_path):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2)
    stranger = CredentialStore(tmp_path).ensure(Identity("tenant", "acme"))  # a key the server never heard of
    options = MeshSettings(nats_creds=stranger).nats_options()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2, **options)


# -- tenants --


async def test_a_tenant_submits_reads_and_stores_only_as_itself(secured):
    p = PREFIX
    async with connected(secured, "tenant", "acme") as acme:
        others = [
            SUBJECTS.task_submit("globex"),
            SUBJECTS.artifact_get("globex"),
            SUBJECTS.artifact_put("globex"),
            SUBJECTS.feedback("globex"),
            direct_get(SUBJECTS.stream(STREAM_TASK_EVENTS), SUBJECTS.task_events_of_tenant("globex")),
        ]
        assert await refused_publishes(acme, others) == others
        internal = [
            SUBJECTS.budget_reserve,
            SUBJECTS.budget_settle,
            SUBJECTS.step_request,
            SUBJECTS.infer_cloud("openai"),
            SUBJECTS.usage("acme"),
            SUBJECTS.operator("alice", OPERATOR_KILL),
            f"{KV_API}.{SUBJECTS.bucket(BUCKET_CONTROL)}.kill.global",
            f"{p}.control.kill",
            "$JS.API.STREAM.PURGE." + SUBJECTS.stream(STREAM_TASK_EVENTS),
        ]
        assert await refused_publishes(acme, internal) == internal
        reads = [SUBJECTS.task_events_of_tenant("globex"), SUBJECTS.task_events, "_INBOX.>", f"{p}.>"]
        assert await refused_subscriptions(acme, reads) == reads
        own = [SUBJECTS.task_submit("acme"), SUBJECTS.artifact_put("acme"), SUBJECTS.feedback("acme")]
        assert await refused_publishes(acme, own) == []
        assert await refused_subscriptions(acme, [SUBJECTS.task_events_of_tenant("acme")]) == []


# -- agents --


async def test_an_agent_answers_only_its_own_subject(secured):
    async with connected(secured, "agent", "echo") as echo:
        assert await refused_subscriptions(echo, [SUBJECTS.agent("other"), f"{PREFIX}.agent.*"]) == [
            SUBJECTS.agent("other"),
            f"{PREFIX}.agent.*",
        ]
        assert await refused_subscriptions(echo, [SUBJECTS.agent("echo"), "$SRV.PING", "$SRV.INFO.echo"]) == []
        refused = [SUBJECTS.task_submit("acme"), SUBJECTS.budget_reserve, SUBJECTS.infer_cloud("openai")]
        assert await refused_publishes(echo, refused) == refused

    # And it answers a request on its own subject (allow_responses), which another agent cannot take.
    async with connected(secured, "agent", "echo") as echo, connected(secured, "operator", "alice") as alice:

        async def answer(msg) -> None:
            await msg.respond(b"echo:" + msg.data)

        await echo.nc.subscribe(SUBJECTS.agent("echo"), queue="q", cb=answer)
        # Twice: nats-py's first PING can overtake the SUB still in its send queue (Bus.flush says more).
        await echo.nc.flush()
        await echo.nc.flush()
        assert (await alice.nc.request(SUBJECTS.agent("echo"), b"hi", timeout=5)).data == b"echo:hi"


# -- services and operators: the accountant's state --


async def test_only_the_accountant_writes_ledger_budgets_switches_and_pace(secured):
    protected = [
        SUBJECTS.ledger,
        f"{KV_API}.{SUBJECTS.bucket(BUCKET_BUDGETS)}.tenant.acme",
        f"{KV_API}.{SUBJECTS.bucket(BUCKET_CONTROL)}.kill.global",
        f"{KV_API}.{SUBJECTS.bucket(BUCKET_CONTROL)}.pace.acme",
        SUBJECTS.control_kill,
        SUBJECTS.control_budget,
        "$JS.API.STREAM.PURGE.KV_" + SUBJECTS.bucket(BUCKET_CONTROL),
        "$JS.API.STREAM.DELETE." + SUBJECTS.stream(STREAM_CONTROL),
        "$JS.API.STREAM.MSG.DELETE.KV_" + SUBJECTS.bucket(BUCKET_BUDGETS),
    ]
    for kind, name in (("service", "router"), ("service", "planner"), ("operator", "alice")):
        async with connected(secured, kind, name) as client:
            assert await refused_publishes(client, protected) == protected, (kind, name)
    async with connected(secured, "service", "accountant") as accountant:
        assert await refused_publishes(accountant, protected) == []


async def test_nobody_but_the_accountant_makes_a_stream_that_could_republish_onto_its_state(secured):
    """A stream's configuration is its creator's, and a RePublish in it makes the server write where its
    creator may not publish (a kill switch, a cap, the ledger). So a service may create only the mesh's
    own streams and buckets when they are missing, an operator none, and nobody but the accountant
    changes one."""
    evil = "$JS.API.STREAM.CREATE.EVIL"
    usage = f"$JS.API.STREAM.UPDATE.{SUBJECTS.stream(STREAM_USAGE)}"
    own = f"$JS.API.STREAM.CREATE.KV_{SUBJECTS.bucket(BUCKET_RESPONSE_CACHE)}"
    async with connected(secured, "service", "router") as router:
        assert await refused_publishes(router, [evil, usage, own]) == [evil, usage]
    async with connected(secured, "operator", "alice") as alice:
        assert await refused_publishes(alice, [evil, usage, own]) == [evil, usage, own]
        # And the attack itself, through the client's own API: refused, nothing republished.
        with pytest.raises(TimeoutError):
            await alice.nc.jetstream(timeout=1).add_stream(
                StreamConfig(
                    name="EVIL2",
                    subjects=[f"{PREFIX}.bench.evil"],
                    republish=RePublish(src=">", dest=f"{KV_API}.{SUBJECTS.bucket(BUCKET_CONTROL)}.kill.global"),
                )
            )
    async with connected(secured, "service", "accountant") as accountant:
        assert await refused_publishes(accountant, [evil, usage]) == []


async def test_switches_and_caps_change_only_on_an_operators_own_subject(secured):
    async with connected(secured, "operator", "alice") as alice:
        others = [SUBJECTS.operator("bob", OPERATOR_KILL), SUBJECTS.operator("bob", OPERATOR_BUDGET)]
        assert await refused_publishes(alice, others) == others
        own = [SUBJECTS.operator("alice", OPERATOR_KILL), SUBJECTS.operator("alice", OPERATOR_BUDGET)]
        assert await refused_publishes(alice, own) == []
    async with connected(secured, "service", "router") as router:
        assert await refused_publishes(router, own) == own


async def test_nobody_forges_jetstreams_advisories(secured):
    advisory = f"{JS_EVENT}.ADVISORY.CONSUMER.MAX_DELIVERIES.{SUBJECTS.stream('TASKS')}.planner"
    for kind, name in (("service", "accountant"), ("service", "router"), ("operator", "alice")):
        async with connected(secured, kind, name) as client:
            assert await refused_publishes(client, [advisory, "$SYS.REQ.SERVER.PING"]) == [
                advisory,
                "$SYS.REQ.SERVER.PING",
            ], (kind, name)


# -- the services on their own credentials: who an action is by comes from the subject --


@pytest.fixture(scope="module")
async def mesh_on_identities(secured, tmp_path_factory, infra, data_dir):
    """The accountant, planner and artifact store on the module's server, each as itself."""
    from services.registry import create_app

    base = MeshSettings(clickhouse_url=infra.clickhouse_url, data=data_dir, log_level="WARNING")
    home = tmp_path_factory.mktemp("mesh-home")
    apps = []
    for name in ("accountant", "artifact-store", "planner"):
        app = create_app(name, secured.settings(base, "service", name).model_copy(update={"home": home}))
        await app.start()
        apps.append(app)
    yield base
    for app in reversed(apps):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(), 10)


async def bus_of(secured: Secured, base: MeshSettings, kind: str, name: str) -> Bus:
    bus = Bus(secured.settings(base, kind, name), f"{kind}-{name}", reconnect_attempts=0)
    await bus.connect()
    return bus


async def test_a_tenant_runs_its_own_task_reads_its_events_and_cannot_pose_as_another(secured, mesh_on_identities):
    from services.cli.client import MeshClient

    base = mesh_on_identities
    operator = await bus_of(secured, base, "operator", "alice")
    letters = await operator.jetstream.subscribe(SUBJECTS.dlq("planner"), stream=SUBJECTS.stream(STREAM_DLQ))
    async with MeshClient(secured.settings(base, "tenant", "acme")) as acme:
        # Its own task (a workflow that does not exist: it fails at once, with a stored terminal event).
        task = new_task(tenant="acme", workflow="no-such-workflow")
        events = await acme.follow(task, timeout_s=20)
        await acme.submit(task)
        ending = [event async for event in events][-1]
        assert ending.kind == "failed" and "no-such-workflow" in ending.detail
        # The stored ending is readable again by acme alone (direct get by subject).
        stored = await acme.bus.last_stored(
            SUBJECTS.stream(STREAM_TASK_EVENTS), SUBJECTS.task_events_of("acme", task.id)
        )
        assert stored is not None and msgspec.json.decode(stored)["kind"] == "failed"

        # A task whose body names globex, sent on acme's subject: refused by the planner, kept with the reason.
        posing = new_task(tenant="globex")
        await acme.bus.publish(
            SUBJECTS.task_submit("acme"), posing, stream=SUBJECTS.stream("TASKS"), headers={"Nats-Msg-Id": posing.id}
        )
        letter = msgspec.json.decode((await letters.next_msg(timeout=10)).data, type=DeadLetter)
        assert "names tenant 'globex' but was submitted as 'acme'" in letter.error
    await letters.unsubscribe()
    await operator.close()


async def test_a_tenant_gets_only_its_own_artifacts_whatever_the_request_says(secured, mesh_on_identities):
    from services.cli.client import MeshClient

    base = mesh_on_identities
    body = {"text": "globex's plan"}
    async with MeshClient(secured.settings(base, "tenant", "globex")) as globex:
        ref = await globex.put_artifact(Artifact(type="text", tenant="globex", body=body, created_ms=now_ms()))
        assert (await globex.artifact(ref.id, "globex")).body == body
    async with MeshClient(secured.settings(base, "tenant", "acme")) as acme:
        # On its own subject, naming globex in the body: asked as acme, so refused as missing.
        request = ArtifactGet(id=ref.id, tenant="globex")
        reply = await acme.bus.request(SUBJECTS.artifact_get("acme"), request, ArtifactReply, 5)
        assert reply.artifact is None and reply.error == "not found"


async def test_an_operators_switch_and_cap_change_are_made_by_the_accountant_and_recorded_with_who(
    secured, mesh_on_identities, ch
):
    base = mesh_on_identities
    key = "idt-" + uuid.uuid4().hex[:8]
    alice = await bus_of(secured, base, "operator", "alice")
    # Alice writes "by": "mallory"; the accountant writes who the subject says.
    switch = KillSwitch(scope="tenant", key=key, tripped=True, reason="test", by="mallory", time_ms=0)
    written = await alice.request(SUBJECTS.operator("alice", OPERATOR_KILL), switch, KillSwitch, 10)
    assert written.by == "alice" and written.time_ms > 0
    state = await alice.request(
        SUBJECTS.operator("alice", OPERATOR_BUDGET),
        BudgetUpdate(scope="tenant", key=key, day_usd=2.5, by="mallory"),
        BudgetState,
        10,
    )
    assert state.error is None
    # The switch is in the control bucket, where every service reads it.
    control = await alice.key_value(SUBJECTS.bucket(BUCKET_CONTROL), history=16)
    stored = msgspec.json.decode((await control.get(f"kill.tenant.{key}")).value, type=KillSwitch)
    assert stored.tripped and stored.by == "alice"
    await alice.close()

    async def rows(sql: str) -> list[tuple]:
        # In a thread: the services share this event loop, and a blocked loop misses the accountant's lease.
        return (await asyncio.to_thread(ch.query, sql, parameters={"k": key})).result_rows

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kills = await rows("SELECT by, tripped FROM kill_events FINAL WHERE key = %(k)s")
        budgets = await rows("SELECT by, toFloat64(day_usd) FROM budget_changes FINAL WHERE key = %(k)s")
        if kills and budgets:
            break
        await asyncio.sleep(0.3)
    assert kills == [("alice", True)]
    assert budgets == [("alice", 2.5)]


async def test_the_cli_changes_caps_and_switches_as_the_credentials_operator(secured, mesh_on_identities, tmp_path):
    key = "idt-" + uuid.uuid4().hex[:8]
    env = {
        "NATS_URL": secured.url,
        "FRUGALMESH_NATS_CREDS": str(secured.creds("operator", "bob")),
        "FRUGALMESH_SUBJECT_PREFIX": PREFIX,
        "FRUGALMESH_HOME": str(tmp_path),
        "PATH": str(Path(sys.executable).parent),
    }
    cli = [sys.executable, "-m", "services.cli.main"]
    # In a thread: the accountant answering it runs on this test's event loop.
    killed = await asyncio.to_thread(
        subprocess.run, [*cli, "kill", "--scope", "tenant", "--key", key], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 0, killed.stderr
    assert f"tripped: tenant {key} (by bob)" in killed.stdout
    # A tenant's credential cannot (the server would refuse its publish): the CLI says so before it asks.
    env["FRUGALMESH_NATS_CREDS"] = str(secured.creds("tenant", "acme"))
    budget_set = [*cli, "budget", "set", "--scope", "tenant", "--key", key, "--day", "1"]
    refused = await asyncio.to_thread(subprocess.run, budget_set, env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "is tenant 'acme''s credential: changing caps and switches takes an operator's" in refused.stderr
    operator = await bus_of(secured, mesh_on_identities, "operator", "bob")
    state = await operator.request(SUBJECTS.budget_show, BudgetQuery(scope="tenant", key=key), BudgetState, 10)
    await operator.close()
    assert all(cap.day_usd is None for cap in state.caps if cap.key == key)


# -- TLS --


def test_tls_with_a_ca_is_a_setting_and_a_client_without_the_ca_is_refused(tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(cert)
    server_cert.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_file)
    server = EmbeddedNats(tmp_path / "nats", port=-1, config=f'tls {{ cert_file: "{cert}"\n key_file: "{key}" }}\n')
    server.start()

    async def reach(settings: MeshSettings) -> bool:
        try:
            nc = await nats.connect(
                settings.nats_url, allow_reconnect=False, connect_timeout=3, **settings.nats_options()
            )
        except Exception:  # nats-py raises ssl.SSLError, or its own errors, for a refused handshake
            return False
        await nc.close()
        return True

    try:
        url = server.url.replace("nats://", "tls://")
        assert asyncio.run(reach(MeshSettings(nats_url=url, nats_tls_ca=ca_file, nats_creds=None)))
        assert not asyncio.run(reach(MeshSettings(nats_url=url, nats_creds=None)))
    finally:
        server.stop()
    assert isinstance(MeshSettings(nats_tls_ca=ca_file).nats_options()["tls"], ssl.SSLContext)


# -- `frugalmesh creds` against a running stack --


def test_creds_create_lets_a_new_tenant_in_at_once_and_revoke_shuts_it_out(tmp_path):
    home = tmp_path / "home"
    store = CredentialStore(home)
    store.ensure(Identity("operator", "alice"))
    server = EmbeddedNats(home / "nats", port=-1, auth_file=store.write_auth(Subjects(), home))
    server.start()
    # What `frugalmesh up` leaves for the other commands: where its servers run.
    state = {"pid": os.getpid(), "nats_url": server.url, "clickhouse_url": "", "nats_pids": [server.process.pid]}
    (home / "stack.json").write_text(json.dumps(state))
    env = {**os.environ, "FRUGALMESH_HOME": str(home), "NATS_URL": server.url}
    env.pop("FRUGALMESH_NATS_CREDS", None)

    def creds(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", "creds", *args], env=env, capture_output=True, text=True
        )

    async def connects(seed: Path) -> bool:
        try:
            nc = await nats.connect(
                server.url, allow_reconnect=False, connect_timeout=2, **MeshSettings(nats_creds=seed).nats_options()
            )
        except nats.errors.Error:
            return False
        await nc.close()
        return True

    try:
        created = creds("create", "--tenant", "acme")
        assert created.returncode == 0, created.stderr
        seed = store.path(Identity("tenant", "acme"))
        assert f"tenant acme: {seed}" in created.stdout and "read" in created.stdout
        assert seed.stat().st_mode & 0o777 == 0o600
        assert asyncio.run(connects(seed))
        again = creds("create", "--tenant", "acme")
        assert again.returncode == 1 and "already has a credential" in again.stderr
        assert creds("create", "--tenant", "acme", "--agent", "x").returncode == 2
        assert "tenant    acme U" in creds("list").stdout
        kept = tmp_path / "kept" / seed.name  # what the tenant still holds after the operator revokes it
        kept.parent.mkdir()
        kept.write_bytes(seed.read_bytes())
        revoked = creds("revoke", "--tenant", "acme")
        assert revoked.returncode == 0, revoked.stderr
        assert not seed.exists()
        deadline = time.monotonic() + 5  # the server reloads asynchronously
        while asyncio.run(connects(kept)):
            assert time.monotonic() < deadline, "a revoked key still gets in"
            time.sleep(0.1)
    finally:
        server.stop()


# -- a client nobody here wrote --


async def test_a_tenant_client_on_the_nats_npm_package_runs_its_task_and_is_refused_another_tenants_subject(
    secured, mesh_on_identities
):
    node, node_dir = shutil.which("node"), Path(__file__).parent / "node"
    # Node.js and npm are on every machine this project builds on: without them this check would not happen.
    assert node is not None and shutil.which("npm") is not None, (
        "install Node.js and npm (`apt-get install nodejs npm`)"
    )
    if not (node_dir / "node_modules" / "nats").is_dir():
        installed = await asyncio.to_thread(
            subprocess.run, ["npm", "ci", "--no-audit", "--no-fund"], cwd=node_dir, capture_output=True, text=True
        )
        assert installed.returncode == 0, installed.stderr[-2000:]
    args = [secured.url, str(secured.creds("tenant", "acme")), PREFIX, "acme", "globex"]
    # In a thread: the services answering it run on this test's event loop.
    ran = await asyncio.to_thread(
        subprocess.run, [node, "tenant_check.mjs", *args], cwd=node_dir, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    out = json.loads(ran.stdout)

    assert out["kinds"][0] == "accepted" and out["kinds"][-1] == "failed"
    assert out["stored_kind"] == "failed"
    refused = {"error": "PERMISSIONS_VIOLATION", "operation": "publish", "subject": SUBJECTS.task_submit("globex")}
    assert out["refusals"] == [refused]
