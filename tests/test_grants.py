"""Paid calls run only on a grant the accountant signed (services/runtime/grants.py), and a task's
cap belongs to its (tenant, task).

Unit: signing and verifying, every way a grant can fail to allow a call, where the key comes from,
the ledger's task buckets and its snapshots. Infra, on a real nats-server (and ClickHouse for the
accountant): a paid call through router, accountant and inference runs on its grant; paid requests
sent straight to an inference service without a valid grant are refused and metered once; a free
call needs none; two tenants' tasks of one id each have their own cap.
"""

from __future__ import annotations

import base64
import shutil
import stat
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
from fakes.grants import granted
from helpers import eventually, make_request, make_step, shipped_catalog
from mesh_client import ask, call, request, usage_events
from nats.js.errors import KeyNotFoundError

from schemas.messages import InferenceRequest, Reservation, ReservationDecision
from schemas.subjects import BUCKET_CONTROL, control_kill_key
from services.accountant.ledger import Grant, Ledger, Settle, buckets_for, pico
from services.runtime.bus import now_ms
from services.runtime.data import load_recorded_outcomes
from services.runtime.grants import (
    PUBLIC_KEY_ENV,
    SEED_ENV,
    SEED_FILE,
    SEED_FILE_ENV,
    GrantClaims,
    GrantError,
    GrantKeyError,
    GrantReused,
    GrantSigner,
    GrantVerifier,
    key_environments,
    load_signer,
    load_verifier,
    new_seed,
    reservation_for,
    seed_file,
)
from services.runtime.settings import REPO_DEPLOY_DIR

LOCAL = "mixtral-8x7b-local"
MID = "mixtral-8x7b"
FRONTIER = "gpt-4-1106-preview"
CATALOG = shipped_catalog()
QUESTION = "What is six times seven?"




def worst_pico(r: InferenceRequest) -> int:
    return pico(reservation_for(r, CATALOG.model(r.model)).amount_usd)


def check(verifier: GrantVerifier, r: InferenceRequest, now: int | None = None) -> GrantClaims:
    return verifier.check(r, CATALOG.model(r.model), now_ms() if now is None else now)


def reforged(grant: str, **claims) -> str:
    """``grant`` with its claims changed and its signature kept."""
    payload, _, signature = grant.partition(".")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    changed = msgspec.structs.replace(msgspec.json.decode(raw, type=GrantClaims), **claims)
    return base64.urlsafe_b64encode(msgspec.json.encode(changed)).rstrip(b"=").decode() + "." + signature


# -- signing and verifying --


@pytest.mark.unit
def test_a_grant_verifies_for_the_call_it_names_with_the_public_key_alone():
    signer = GrantSigner(new_seed())
    r = granted(make_request(FRONTIER, QUESTION, max_tokens=200), signer=signer)

    claims = check(GrantVerifier(signer.public_key), r)

    assert (claims.call_id, claims.tenant, claims.task_id, claims.model, claims.key_id) == (
        r.call_id,
        "acme",
        "task-1",
        FRONTIER,
        "",
    )
    assert claims.amount_pico == worst_pico(r) > 0 and claims.expires_ms == r.deadline_ms
    assert signer.public_key.startswith("A") and len(r.grant) < 400


@pytest.mark.unit
def test_a_grant_allows_nothing_but_its_own_call():
    signer = GrantSigner(new_seed())
    verifier = GrantVerifier(signer.public_key)
    ok = granted(make_request(FRONTIER, QUESTION, max_tokens=200), signer=signer)
    other = make_request(FRONTIER, QUESTION, max_tokens=200)
    cases = {
        "no grant": (msgspec.structs.replace(ok, grant=""), "carries no grant"),
        "malformed": (msgspec.structs.replace(ok, grant="not-a-grant"), "malformed"),
        "another key": (granted(ok, signer=GrantSigner(new_seed())), "does not verify"),
        "claims changed": (msgspec.structs.replace(ok, grant=reforged(ok.grant, amount_pico=10**15)), "not verify"),
        "another model": (granted(ok, signer=signer, model=MID), "for model 'mixtral-8x7b'"),
        "another call": (msgspec.structs.replace(other, grant=ok.grant), "for call"),
        "another tenant": (msgspec.structs.replace(ok, tenant="globex"), "for tenant 'acme', not 'globex'"),
        "another task": (msgspec.structs.replace(ok, task_id="task-2"), "for task"),
        "another key id": (msgspec.structs.replace(ok, key_id="fmk_x"), "for virtual key"),
        "more max_tokens": (msgspec.structs.replace(ok, max_tokens=4000), "for prompt"),
        "a longer prompt": (msgspec.structs.replace(ok, messages=ok.messages * 20), "for prompt"),
        # not a worst case above the hold, but not the prompt granted either
        "a shorter prompt": (
            msgspec.structs.replace(ok, messages=[msgspec.structs.replace(ok.messages[0], content="hi")]),
            "for prompt",
        ),
        "a later deadline": (msgspec.structs.replace(ok, deadline_ms=ok.deadline_ms + 1), "past the grant's expiry"),
        "expired": (granted(ok, signer=signer, expires_ms=now_ms() - 1), "expired"),
    }
    for name, (r, reason) in cases.items():
        try:
            check(verifier, r)
        except GrantError as exc:
            assert reason in str(exc), (name, str(exc))
        else:
            pytest.fail(f"{name}: allowed")

    check(verifier, ok)  # none of the refusals used it up
    with pytest.raises(GrantReused, match="already used"):
        check(verifier, ok)
    # Forgotten once expired (when it no longer allows anything anyway).
    with pytest.raises(GrantError, match="expired"):
        check(verifier, ok, now=ok.deadline_ms)
    assert ok.call_id not in verifier._used


# -- keys --


@pytest.mark.unit
def test_the_seed_file_is_made_once_owner_only_and_shared_by_processes_starting_together(tmp_path, monkeypatch):
    for name in (SEED_ENV, SEED_FILE_ENV, PUBLIC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    with ThreadPoolExecutor(8) as pool:
        seeds = set(pool.map(lambda _: seed_file(home / SEED_FILE), range(16)))

    assert len(seeds) == 1
    path = home / SEED_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in home.iterdir()] == [SEED_FILE]  # no temporary left behind
    signer = load_signer(home)
    assert load_verifier(home).public_key == signer.public_key == GrantSigner(seeds.pop()).public_key

    path.chmod(0o644)
    with pytest.raises(GrantKeyError, match="readable by others"):
        load_signer(home)


@pytest.mark.unit
def test_the_environment_names_the_keys_and_a_bad_one_is_a_clear_error(tmp_path, monkeypatch):
    for name in (SEED_ENV, SEED_FILE_ENV, PUBLIC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    seed = new_seed()
    monkeypatch.setenv(SEED_ENV, seed.decode())
    assert load_signer(tmp_path).public_key == GrantSigner(seed).public_key
    assert not (tmp_path / SEED_FILE).exists()

    other = GrantSigner(new_seed())
    monkeypatch.setenv(PUBLIC_KEY_ENV, other.public_key)
    assert load_verifier(tmp_path).public_key == other.public_key  # the inference side's own setting

    monkeypatch.setenv(PUBLIC_KEY_ENV, "Anot-a-key")
    with pytest.raises(GrantKeyError, match=PUBLIC_KEY_ENV):
        load_verifier(tmp_path)
    monkeypatch.setenv(PUBLIC_KEY_ENV, GrantSigner(new_seed()).public_key.replace("A", "U", 1))
    with pytest.raises(GrantKeyError, match=PUBLIC_KEY_ENV):
        load_verifier(tmp_path)
    monkeypatch.setenv(SEED_ENV, "SAnot-a-seed")
    with pytest.raises(GrantKeyError, match=SEED_ENV):
        load_signer(tmp_path)

    monkeypatch.delenv(SEED_ENV)
    monkeypatch.setenv(SEED_FILE_ENV, str(tmp_path / "keys" / "accountant.seed"))
    made = load_signer(tmp_path)
    assert (tmp_path / "keys" / "accountant.seed").exists() and not (tmp_path / SEED_FILE).exists()
    assert load_signer(tmp_path).public_key == made.public_key


@pytest.mark.unit
def test_a_launcher_gives_every_service_the_public_key_and_the_accountant_alone_the_seed(tmp_path, monkeypatch):
    for name in (SEED_ENV, SEED_FILE_ENV, PUBLIC_KEY_ENV):
        monkeypatch.delenv(name, raising=False)

    every, accountant = key_environments(tmp_path)

    assert accountant == {SEED_FILE_ENV: str(tmp_path / SEED_FILE)}
    assert every == {PUBLIC_KEY_ENV: load_signer(tmp_path).public_key, SEED_ENV: "", SEED_FILE_ENV: ""}
    with monkeypatch.context() as child:  # an inference service's environment
        for name, value in every.items():
            child.setenv(name, value)
        child.setenv("HOME", str(tmp_path / "elsewhere"))
        assert load_verifier(tmp_path / "elsewhere").public_key == every[PUBLIC_KEY_ENV]
    assert not (tmp_path / "elsewhere").exists()
    with monkeypatch.context() as child:  # the accountant's
        for name, value in {**every, **accountant}.items():
            child.setenv(name, value)
        assert load_signer(tmp_path / "elsewhere").public_key == every[PUBLIC_KEY_ENV]

    seed = new_seed()
    monkeypatch.setenv(SEED_ENV, seed.decode())
    every, accountant = key_environments(tmp_path)
    assert accountant == {SEED_ENV: seed.decode()} and every[PUBLIC_KEY_ENV] == GrantSigner(seed).public_key


# -- the ledger: a task's cap and spend belong to its (tenant, task) --


def hold(i: int, tenant: str, amount: float = 0.05, task_cap: float | None = 0.1) -> Grant:
    r = Reservation(
        id=f"call-{i}",
        tenant=tenant,
        task_id="task-1",
        model="m1",
        amount_usd=amount,
        expires_ms=now_ms() + 60_000,
        task_budget_usd=task_cap,
    )
    return Grant(r, pico(amount), now_ms(), task_capped=True, task_cap=None if task_cap is None else pico(task_cap))


@pytest.mark.unit
def test_two_tenants_tasks_of_one_id_have_their_own_bucket_and_cap_through_a_snapshot():
    ledger = Ledger()
    ledger.apply(hold(1, "acme", task_cap=0.1))
    ledger.apply(hold(2, "globex", task_cap=0.3))
    ledger.apply(Settle("call-1", pico(0.04), now_ms()))

    for restored in (ledger, Ledger.restore(ledger.snapshot())):
        assert restored.task_caps == {("acme", "task-1"): pico(0.1), ("globex", "task-1"): pico(0.3)}
        assert restored.settled[("task", "task-1", "task", "acme")] == pico(0.04)
        assert restored.reserved == {b: pico(0.05) for b in restored.holds["call-2"].buckets}
        assert ("task", "task-1", "task", "globex") in restored.reserved
    buckets = buckets_for(hold(3, "globex").reservation, now_ms(), task_capped=True)
    assert ("task", "task-1", "task", "globex") in buckets


@pytest.mark.unit
def test_a_snapshot_from_before_tenant_keyed_tasks_still_restores():
    old = {
        "settled": [[["task", "task-1", "task", ""], 5]],
        "holds": [],
        "settled_ids": {"call-0": 1},
        "task_caps": {"task-1": 100},
        "task_touched": {"task-1": 1},
        "tripped": [],
    }

    ledger = Ledger.restore(msgspec.json.encode(old))

    assert ledger.task_caps == {("", "task-1"): 100}  # no tenant's: binds no new call
    ledger.prune(now_ms(), keep_ids_ms=1, keep_tasks_ms=1)
    assert ledger.settled == {} and ledger.task_caps == {} and ledger.task_touched == {}


# -- on the live services --


async def start_accountant(start_service, settings):
    return await start_service("accountant", settings, database=settings.subject_prefix, sweep_interval_s=0.02)


def counted(events) -> Counter:
    return Counter(e.event_id for e in events)


@pytest.mark.infra
async def test_a_paid_call_through_router_and_accountant_runs_on_the_accountants_grant(
    signer, start_service, settings, nc, prompts
):
    await start_accountant(start_service, settings)
    for service in ("cloud-inference", "router"):
        await start_service(service, settings)
    seen = await nc.subscribe(settings.subjects.infer_cloud_all)  # beside the queue group: sees every request
    await nc.flush()

    result = await ask(nc, settings, make_step(next(prompts), role="review"))

    assert result.error is None and result.model == FRONTIER and result.cost_usd > 0
    sent = msgspec.json.decode((await seen.next_msg(timeout=2)).data, type=InferenceRequest)
    assert sent.reservation_id == sent.call_id == result.call_id and sent.grant
    claims = GrantVerifier(signer.public_key).claims(sent.grant)
    assert (claims.call_id, claims.model, claims.expires_ms) == (result.call_id, FRONTIER, sent.deadline_ms)
    assert claims.amount_pico == worst_pico(sent)
    [event] = await usage_events(nc, settings)
    assert (event.event_id, event.service, event.outcome) == (result.call_id, "cloud-inference", "ok")


@pytest.mark.infra
async def test_the_accountant_signs_grants_only_and_a_repeat_gets_the_same_grant(signer, start_service, settings, nc):
    await start_accountant(start_service, settings)
    verifier = GrantVerifier(signer.public_key)
    r = Reservation(
        id=uuid.uuid4().hex, tenant="acme", task_id="t", model=FRONTIER, amount_usd=0.01, expires_ms=now_ms() + 60_000
    )

    first = await request(nc, settings.subjects.budget_reserve, r, ReservationDecision)
    repeat = await request(nc, settings.subjects.budget_reserve, r, ReservationDecision)
    refused = await request(
        nc, settings.subjects.budget_reserve, msgspec.structs.replace(r, id="x", tenant="a.b"), ReservationDecision
    )

    assert first.granted and verifier.claims(first.grant) == GrantClaims.of(r)
    assert (repeat.granted, repeat.reason) == (True, "already reserved")
    assert verifier.claims(repeat.grant) == GrantClaims.of(r)
    assert not refused.granted and refused.grant == "" and "subject token" in refused.reason


@pytest.mark.infra
async def test_paid_calls_straight_to_inference_without_a_valid_grant_are_refused_and_metered_once(
    signer, start_service, settings, nc, prompts
):
    await start_service("cloud-inference", settings)
    subject = settings.subjects.infer_cloud("openai")
    ok = granted(make_request(FRONTIER, next(prompts), max_tokens=200), signer=signer)
    other = make_request(FRONTIER, QUESTION, max_tokens=200)

    def real() -> InferenceRequest:
        """A call with its own real grant, for a case to change one thing of."""
        return granted(make_request(FRONTIER, QUESTION, max_tokens=200), signer=signer)

    longer, later = real(), real()
    refused = {
        "none": make_request(FRONTIER, QUESTION),
        "forged": granted(make_request(FRONTIER, QUESTION), signer=GrantSigner(new_seed())),
        "tampered": msgspec.structs.replace(other, grant=reforged(granted(other, signer=signer).grant, model=MID)),
        "other model": granted(make_request(FRONTIER, QUESTION), signer=signer, model=MID),
        "larger max_tokens": msgspec.structs.replace(
            granted(make_request(FRONTIER, QUESTION, max_tokens=50), signer=signer), max_tokens=2000
        ),
        "other call id": msgspec.structs.replace(other, grant=ok.grant),
        "expired": granted(make_request(FRONTIER, QUESTION), signer=signer, expires_ms=now_ms() - 1),
        "malformed": msgspec.structs.replace(real(), grant="not-a-grant"),
        "other tenant": msgspec.structs.replace(real(), tenant="globex"),
        "other task": msgspec.structs.replace(real(), task_id="task-2"),
        "other virtual key": msgspec.structs.replace(real(), key_id="fmk_x"),
        "longer prompt": msgspec.structs.replace(longer, messages=longer.messages * 20),
        "later deadline": msgspec.structs.replace(later, deadline_ms=later.deadline_ms + 1),
    }

    results = {name: await call(nc, subject, r) for name, r in refused.items()}
    answered = await call(nc, subject, ok)
    replayed = await call(nc, subject, ok)

    for name, result in results.items():
        assert result.error is not None and result.error.kind == "refused", name
        assert result.error.message.startswith("no valid grant: "), (name, result.error.message)
        assert (result.cost_usd, result.output) == (0, ""), name
    assert answered.error is None and answered.cost_usd > 0
    assert replayed.error is not None and "already used" in replayed.error.message
    events = await usage_events(nc, settings)
    assert counted(events) == Counter({r.call_id: 1 for r in [*refused.values(), ok]})
    by_id = {e.event_id: e for e in events}
    for name, r in refused.items():
        event = by_id[r.call_id]
        assert (event.service, event.outcome, event.cost_usd, event.input_tokens) == (
            "cloud-inference",
            "refused",
            0,
            0,
        ), name
    assert by_id[ok.call_id].outcome == "ok"


@pytest.mark.infra
async def test_a_free_local_call_needs_no_grant(signer, start_service, settings, nc, tmp_path, prompts):
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_DEPLOY_DIR, deploy)
    models = deploy / "models.toml"
    text = models.read_text()
    assert text.count('hardware = "a100x2-rented"') == 1
    models.write_text(text.replace('hardware = "a100x2-rented"', "input_usd_per_mtok = 0\noutput_usd_per_mtok = 0"))
    free = settings.model_copy(update={"deploy_dir": deploy})
    await start_service("local-inference", free, load_interval_s=0)

    result = await call(nc, free.subjects.infer_local(LOCAL), make_request(LOCAL, next(prompts)))

    assert result.error is None and result.cost_usd == 0 and result.output
    [event] = await usage_events(nc, free)
    assert (event.outcome, event.cost_usd) == ("ok", 0)


@pytest.mark.infra
async def test_two_tenants_tasks_of_one_id_each_have_their_own_cap(signer, start_service, settings, nc):
    await start_accountant(start_service, settings)

    async def reserve(i: int, tenant: str, amount: float, task_budget: float | None) -> ReservationDecision:
        r = Reservation(
            id=f"call-{i}",
            tenant=tenant,
            task_id="task-1",
            model=FRONTIER,
            amount_usd=amount,
            expires_ms=now_ms() + 60_000,
            task_budget_usd=task_budget,
        )
        return await request(nc, settings.subjects.budget_reserve, r, ReservationDecision)

    assert (await reserve(1, "acme", 0.06, 0.1)).granted
    assert (await reserve(2, "globex", 0.06, 0.1)).granted  # not acme's $0.06 against globex's cap
    acme_again = await reserve(3, "acme", 0.06, None)  # acme's cap is remembered, and acme's alone
    assert not acme_again.granted and acme_again.reason.startswith("task task-1 budget $0.100000 would be exceeded")
    assert (await reserve(4, "globex", 0.03, None)).granted
    assert not (await reserve(5, "globex", 0.03, None)).granted
    assert (await reserve(6, "initech", 0.5, None)).granted  # a third tenant's task-1 has no cap at all

    # acme's task-1 reaching its cap trips acme's task switch, keyed by tenant and task, and no other.
    crossed = Reservation(
        id="call-1", tenant="acme", task_id="task-1", model=FRONTIER, amount_usd=0.06, expires_ms=now_ms() + 60_000,
        actual_usd=0.1,
    )  # fmt: skip
    assert (await request(nc, settings.subjects.budget_settle, crossed, ReservationDecision)).granted
    control = await nc.jetstream().key_value(settings.subjects.bucket(BUCKET_CONTROL))

    async def acme_switch():
        try:
            return msgspec.json.decode((await control.get(control_kill_key("task", "acme.task-1"))).value)
        except KeyNotFoundError:
            return None

    switch = await eventually(acme_switch)
    assert switch["tripped"] and switch["key"] == "acme.task-1"
    keys = await control.keys()
    assert [k for k in keys if k.startswith("kill.task.")] == ["kill.task.acme.task-1"]
