"""Tenant isolation (issue 16, item 3) on a real nats-server: one tenant never reads another's artifacts
or cached answers, and one tenant's task ids never collide with another's.

- Artifacts: an artifact belongs to the tenant it was put for, which is hashed into its id; a get
  as another tenant is answered exactly as a get of a missing id (services/artifact_store/app.py).
- Response cache: per tenant, unless routing.toml's ``[cache] share_across_tenants = true``
  (services/router/cache.py). The inference tier is ``InferencePeer``, so a test sees every call.
- Task ids: a submission's ``Nats-Msg-Id`` is ``<tenant>.<id>`` (``Task.dedupe_id``), and the
  planner keeps a task's events by tenant and id, so two tenants' tasks of one id both run, each
  with its own history.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from fakes.inference_peer import InferencePeer
from fakes.router_peer import result
from helpers import make_step, new_task
from mesh_client import ask, get_artifact, put_artifact, request, submit

from schemas.artifacts import artifact_id
from schemas.messages import Artifact, ArtifactReply, DeadLetter, Task
from schemas.subjects import BUCKET_ARTIFACT_INDEX, HEADER_MSG_ID, STREAM_ARTIFACT_EVENTS, STREAM_DLQ
from services.router.cache import CacheConfig
from services.routing.table import RoutingTable
from services.runtime.settings import REPO_DEPLOY_DIR

ACME, GLOBEX = "acme", "globex"


def note(tenant: str, text: str = "the quarterly figures") -> Artifact:
    return Artifact(type="text", tenant=tenant, task_id="t1", step_id="input", body={"text": text})


# -- artifacts --


@pytest.mark.infra
async def test_another_tenants_get_is_answered_as_a_missing_artifact(settings, start_service, nc):
    await start_service("artifact-store", settings)
    ref = (await put_artifact(nc, settings, note(ACME))).ref
    assert ref is not None

    own = (await get_artifact(nc, settings, ref.id, ACME)).artifact
    assert own is not None and (own.tenant, own.body) == (ACME, {"text": "the quarterly figures"})

    # Refused with the reply a missing id gets: nothing about the artifact, not even that it exists.
    foreign = await get_artifact(nc, settings, ref.id, GLOBEX)
    missing = await get_artifact(nc, settings, "0" * 64, GLOBEX)
    assert foreign.artifact is None and foreign.error is not None
    assert msgspec.json.encode(foreign) == msgspec.json.encode(missing)
    # A get that names no tenant is the default tenant's, and refused the same way.
    bare = await nc.request(
        settings.subjects.artifact_get("default"), msgspec.json.encode({"v": 1, "id": ref.id}), timeout=5
    )
    assert msgspec.json.decode(bare.data, type=ArtifactReply) == missing


@pytest.mark.infra
async def test_the_same_body_put_by_two_tenants_is_two_artifacts(settings, start_service, nc):
    await start_service("artifact-store", settings)
    js = nc.jetstream()

    acme = (await put_artifact(nc, settings, note(ACME))).ref
    globex = (await put_artifact(nc, settings, msgspec.structs.replace(note(GLOBEX), task_id="t2"))).ref

    assert acme is not None and globex is not None and acme.id != globex.id
    assert acme.id == artifact_id(ACME, "text", 1, {"text": "the quarterly figures"})
    # Each reads its own, with its own lineage; neither reads the other's.
    for tenant, ref, task_id in [(ACME, acme, "t1"), (GLOBEX, globex, "t2")]:
        stored = (await get_artifact(nc, settings, ref.id, tenant)).artifact
        assert stored is not None and (stored.tenant, stored.task_id) == (tenant, task_id)
    assert (await get_artifact(nc, settings, acme.id, GLOBEX)).artifact is None
    assert (await get_artifact(nc, settings, globex.id, ACME)).artifact is None
    # The index keeps the tenant the store checks, and each artifact is announced once.
    index = await js.key_value(settings.subjects.bucket(BUCKET_ARTIFACT_INDEX))
    assert msgspec.json.decode((await index.get(acme.id)).value)["tenant"] == ACME
    info = await js.stream_info(settings.subjects.stream(STREAM_ARTIFACT_EVENTS))
    assert info.state.messages == 2


@pytest.mark.infra
async def test_a_put_naming_another_tenant_than_its_subject_is_refused_and_dead_lettered(settings, start_service, nc):
    """The tenant of a put is the subject's (the one the sender's credential may publish as): a body
    naming another, or one that is no subject token, is refused and kept with the reason."""
    await start_service("artifact-store", settings)
    dlq = await nc.jetstream().subscribe(
        settings.subjects.dlq("artifact-store"), stream=settings.subjects.stream(STREAM_DLQ)
    )
    subject = settings.subjects.artifact_put("acme")

    for tenant in ("globex", "acme.*"):
        reply = await request(nc, subject, note(tenant), ArtifactReply, timeout_s=5)

        assert reply.ref is None and f"names tenant {tenant!r} but was put as 'acme'" in reply.error
        letter = msgspec.json.decode((await dlq.next_msg(timeout=5)).data, type=DeadLetter)
        assert letter.subject == subject and "but was put as 'acme'" in letter.error
    await dlq.unsubscribe()


@pytest.mark.infra
async def test_a_task_cannot_take_another_tenants_artifact_as_input(settings, nc, planner_mesh):
    used = await planner_mesh()
    ref = (await put_artifact(nc, used, note(ACME))).ref

    # triage runs a step per input, so the planner reads the inputs first, as the task's tenant.
    events = await submit(nc, used, new_task(tenant=GLOBEX, workflow="triage", goal="Triage", inputs=[ref]))

    assert [e.kind for e in events] == ["accepted", "failed"]
    assert "a task input could not be read" in events[-1].detail and "not found" in events[-1].detail


# -- the response cache --


@pytest.fixture
async def inference(settings, nc) -> InferencePeer:
    """The inference tier, recording every call, and a budget that grants every reservation."""
    await BudgetPeer(nc, settings.subjects).start()
    return await InferencePeer(nc, settings.subjects).start()


def sharing_deploy(tmp_path: Path) -> Path:
    """A copy of deploy/ whose routing.toml shares the response cache across tenants."""
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_DEPLOY_DIR, deploy)
    routing = deploy / "routing.toml"
    shipped = routing.read_text()
    assert "share_across_tenants = false" in shipped
    routing.write_text(shipped.replace("share_across_tenants = false", "share_across_tenants = true"))
    return deploy


@pytest.mark.infra
async def test_the_response_cache_never_serves_one_tenants_answer_to_another(settings, start_service, nc, inference):
    await start_service("router", settings)
    await nc.flush()

    first = await ask(nc, settings, make_step(tenant=ACME))
    other = await ask(nc, settings, make_step(tenant=GLOBEX))
    again = await ask(nc, settings, make_step(tenant=ACME))

    assert (first.cache_hit, other.cache_hit, again.cache_hit) == (False, False, True)
    assert len(inference.requests) == 2  # the other tenant's call ran on the model


@pytest.mark.infra
async def test_a_shared_response_cache_serves_every_tenant(settings, start_service, nc, inference, tmp_path):
    await start_service("router", settings.model_copy(update={"deploy_dir": sharing_deploy(tmp_path)}))
    await nc.flush()

    first = await ask(nc, settings, make_step(tenant=ACME))
    other = await ask(nc, settings, make_step(tenant=GLOBEX))

    assert (first.cache_hit, other.cache_hit) == (False, True) and other.output == first.output
    assert len(inference.requests) == 1


@pytest.mark.unit
def test_cache_sharing_is_off_unless_set_and_parsed_strictly():
    assert CacheConfig.load(REPO_DEPLOY_DIR) == CacheConfig(share_across_tenants=False)
    assert CacheConfig.parse({}) == CacheConfig(share_across_tenants=False)
    assert CacheConfig.parse({"cache": {"share_across_tenants": True}}).share_across_tenants
    with pytest.raises(ValueError, match="true or false"):
        CacheConfig.parse({"cache": {"share_across_tenants": "yes"}})
    with pytest.raises(ValueError, match="unknown keys"):
        CacheConfig.parse({"cache": {"shared": True}})
    with pytest.raises(ValueError, match="must be a table"):
        CacheConfig.parse({"cache": True})
    # The routing table reads the same file and leaves [cache] to the cache.
    RoutingTable.parse({"cache": {"share_across_tenants": False}})


# -- task ids --


@pytest.mark.unit
def test_a_submissions_dedupe_id_names_its_tenant():
    assert Task(id="t-1", tenant=ACME).dedupe_id() == "acme.t-1"
    assert Task(id="t-1", tenant=ACME, idempotency_key="nightly").dedupe_id() == "acme.nightly"
    assert Task(id="t-1", tenant=ACME).dedupe_id() != Task(id="t-1", tenant=GLOBEX).dedupe_id()


@pytest.mark.infra
async def test_two_tenants_tasks_of_one_id_both_run_each_with_its_own_history(settings, nc, planner_mesh, router_peers):
    await planner_mesh()
    # Slow enough that both tasks are in flight at once in the one planner.
    peer = await router_peers(settings, lambda r: result(r, f"answer for {r.tenant}"), delay_s=0.3)
    tasks = [new_task(tenant=tenant, goal="What is 2+2?", deadline_s=10) for tenant in (ACME, GLOBEX)]
    tasks[1].id = tasks[0].id

    runs = await asyncio.gather(*(submit(nc, settings, task) for task in tasks))

    assert peer.max_in_flight == 2
    for task, events in zip(tasks, runs, strict=True):
        done = events[-1]
        assert done.kind == "done" and done.tenant == task.tenant
        assert [e.kind for e in done.history] == ["accepted", "planned", "step_started", "step_done"]
        assert all((e.tenant, e.task_id) == (task.tenant, task.id) for e in done.history)
        answer = (await get_artifact(nc, settings, done.artifact.id, task.tenant)).artifact
        assert answer is not None and answer.body["text"] == f"answer for {task.tenant}"
    # Within one tenant the id still de-duplicates: a resubmission is dropped.
    resubmitted = await nc.jetstream().publish(
        settings.subjects.task_submit(tasks[0].tenant),
        msgspec.json.encode(tasks[0]),
        headers={HEADER_MSG_ID: tasks[0].dedupe_id()},
    )
    assert resubmitted.duplicate
