"""Virtual keys (services/gateway/keys.py, `frugalmesh keys`): a secret shown once and stored only
as its hash; listing never shows one; revoking keeps the key listed; a key's caps are set with the
accountant before the key exists, so no key meant to be capped is ever usable without them. Plus
the request decoding and error mapping the gateway applies before and after a call (unit)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import msgspec
import pytest
from click.testing import CliRunner
from helpers import eventually
from mesh_client import stream_messages

from schemas.messages import BudgetQuery, BudgetState, DeadLetter, ErrorInfo, VirtualKey
from schemas.subjects import BUCKET_KEYS, STREAM_DLQ
from services.cli.keys_commands import keys
from services.gateway.errors import from_mesh
from services.gateway.keys import KeyCache, KeyStore, new_secret, secret_hash
from services.gateway.openai_wire import RequestError, decode_request

# -- unit: secrets, decoding, error mapping --


@pytest.mark.unit
def test_a_secret_is_long_random_and_url_safe_and_its_bucket_key_is_its_sha256():
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert secret.startswith("fm-") and len(secret) >= 3 + 32
        assert all(c.isalnum() or c in "-_" for c in secret)
    secret = secrets.pop()
    assert secret_hash(secret) == hashlib.sha256(secret.encode()).hexdigest()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages[0].audio"),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "messages[0].weight"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
    ],
)
def test_a_request_the_gateway_cannot_honour_names_the_field(body, param):
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}]} | body
    with pytest.raises(RequestError) as refused:
        decode_request(json.dumps(request).encode())
    assert refused.value.param == param


@pytest.mark.unit
def test_echoed_reply_fields_are_accepted_empty():
    assistant = {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "audio": None}
    request = decode_request(json.dumps({"model": "m", "messages": [assistant]}).encode())
    assert request.messages[0].text() == "hi"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kind", "message", "retryable", "status", "retry"),
    [
        ("refused", "tenant acme day cap ($5.000000) would be exceeded", False, 429, "false"),
        ("refused", "kill switch tripped (tenant acme): stop", False, 403, "false"),
        ("refused", "budget service unavailable", True, 503, "true"),
        ("killed", "kill switch tripped (global *): stop", False, 403, "false"),
        ("timeout", "cancelled at the deadline", False, 504, "false"),
        ("provider", "upstream said 500", True, 502, "true"),
        ("pinning", "provider ran gpt-4-0613", False, 502, "false"),
        ("unavailable", "no inference service answers", True, 503, "true"),
        ("invalid", "bad step", False, 400, "false"),
    ],
)
def test_each_mesh_error_kind_has_its_status_and_keeps_the_mesh_message(kind, message, retryable, status, retry):
    error = from_mesh(ErrorInfo(kind=kind, message=message, retryable=retryable))
    response = error.response()
    assert (response.status_code, response.headers["x-should-retry"]) == (status, retry)
    assert json.loads(response.body)["error"]["message"] == message


# -- infra: the store and the CLI --


@pytest.mark.infra
async def test_the_secret_is_stored_nowhere_and_a_revoked_key_stays_listed(bus):
    store = await KeyStore.open(bus)
    secret, key = await store.create("acme", name="ci-bot", allow_models=["gpt-4-1106-preview"], policy="learned")

    kv = await bus.key_value(bus.subjects.bucket(BUCKET_KEYS))
    entry = await kv.get(secret_hash(secret))
    stored = msgspec.json.decode(entry.value, type=VirtualKey)
    assert stored == key and secret.encode() not in entry.value and secret[3:].encode() not in entry.value
    assert (key.tenant, key.name, key.allow_models, key.policy) == ("acme", "ci-bot", ["gpt-4-1106-preview"], "learned")

    revoked = await store.revoke(key.id)
    assert revoked.revoked_ms is not None
    assert [(k.id, k.revoked_ms) for k in await store.list()] == [(key.id, revoked.revoked_ms)]
    with pytest.raises(LookupError):
        await store.revoke("fmk_none")
    with pytest.raises(ValueError):
        await store.create("not a tenant")


def _cli(settings, tmp_path):
    env = {
        "NATS_URL": settings.nats_url,
        "FRUGALMESH_SUBJECT_PREFIX": settings.subject_prefix,
        "FRUGALMESH_HOME": str(tmp_path),  # no `up` stack of this machine is consulted
    }

    def invoke(*args: str, ok: bool = True) -> str:
        result = CliRunner().invoke(keys, list(args), env=env, catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    return invoke


@pytest.mark.infra
async def test_cli_creates_lists_and_revokes_and_never_lists_a_secret(settings, tmp_path):
    invoke = _cli(settings, tmp_path)

    # click runs asyncio.run, so the commands go to a worker thread, away from the test's loop.
    created = json.loads(await asyncio.to_thread(invoke, "create", "--tenant", "acme", "--name", "ci-bot", "--json"))
    assert created["secret"].startswith("fm-") and created["id"].startswith("fmk_")
    text = await asyncio.to_thread(invoke, "create", "--tenant", "globex")
    other_secret = text.strip().splitlines()[-1]
    assert other_secret.startswith("fm-") and "shown once" in text

    listed = await asyncio.to_thread(invoke, "list", "--json")
    assert created["secret"] not in listed and other_secret not in listed
    assert [json.loads(line)["tenant"] for line in listed.splitlines()] == ["acme", "globex"]
    assert "revoked" in await asyncio.to_thread(invoke, "revoke", created["id"])
    table = await asyncio.to_thread(invoke, "list")
    [acme_row] = [line for line in table.splitlines() if created["id"] in line]
    assert "ci-bot" in acme_row and acme_row.rstrip().endswith("Z")  # a revocation time, not "-"
    assert "no key with id" in await asyncio.to_thread(invoke, "revoke", "fmk_missing", ok=False)
    assert "not in the catalogue" in await asyncio.to_thread(
        invoke, "create", "--tenant", "acme", "--allow-model", "gpt-9", ok=False
    )
    assert "is not a policy" in await asyncio.to_thread(
        invoke, "create", "--tenant", "acme", "--policy", "cheap", ok=False
    )
    learned = json.loads(await asyncio.to_thread(invoke, "create", "--tenant", "acme", "--policy", "learned", "--json"))
    assert learned["policy"] == "learned"


@pytest.mark.infra
async def test_caps_are_set_before_the_key_exists_and_no_accountant_means_no_key(settings, tmp_path, start_service, nc):
    invoke = _cli(settings, tmp_path)

    refused = await asyncio.to_thread(invoke, "create", "--tenant", "acme", "--day", "5", ok=False)
    assert "no key was created" in refused
    assert await asyncio.to_thread(invoke, "list", "--json") == ""

    await start_service("accountant", settings, database=settings.subject_prefix)
    created = json.loads(
        await asyncio.to_thread(invoke, "create", "--tenant", "acme", "--day", "5", "--month", "100", "--json")
    )
    reply = await nc.request(
        settings.subjects.budget_show, msgspec.json.encode(BudgetQuery(scope="key", key=created["id"])), timeout=5
    )
    state = msgspec.json.decode(reply.data, type=BudgetState)
    assert [(c.scope, c.key, c.day_usd, c.month_usd) for c in state.caps] == [("key", created["id"], 5.0, 100.0)]


@pytest.mark.infra
async def test_a_garbled_key_record_is_dead_lettered_and_revocations_still_arrive(bus, nc, settings):
    await bus.declare_streams()  # the dead-letter stream, as a running mesh has it
    store = await KeyStore.open(bus)
    good, good_key = await store.create("acme", name="good")
    other, _ = await store.create("acme", name="other")
    kv = await bus.key_value(bus.subjects.bucket(BUCKET_KEYS))
    await kv.put(secret_hash(other), b"{not a key")  # before the replica starts: it must start anyway
    cache = await KeyCache.open(bus)
    assert cache.lookup(good) == good_key and cache.lookup(other) is None  # unreadable: fails closed

    await kv.put(secret_hash(good), b"[garbage]")
    await eventually(lambda: cache.lookup(good) is None)
    again, again_key = await store.create("acme", name="again")
    await eventually(lambda: cache.lookup(again) == again_key)  # the watch went on
    await store.revoke(again_key.id)
    await eventually(lambda: (found := cache.lookup(again)) is not None and found.revoked_ms is not None)

    letters = [msgspec.json.decode(d, type=DeadLetter) for d in await stream_messages(nc, settings, STREAM_DLQ)]
    assert {letter.error.split(":")[0] for letter in letters} == {
        f"virtual key {secret_hash(other)}",
        f"virtual key {secret_hash(good)}",
    }
    await cache.close()
