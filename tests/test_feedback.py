"""The mesh learning from its own traffic, on a real nats-server and ClickHouse: verdicts from the
gateway (`POST /v1/feedback`, through the openai SDK's own HTTP client) and the CLI stored beside
the calls; the online policy's shadow calls judged by the replay backend's recorded grades and
metered under the `shadow` key; `frugalmesh router train --from-clickhouse` turning those labels
into a new router file version that the running router picks up without a restart, and rolling
it back."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import shutil
from pathlib import Path

import clickhouse_connect
import httpx
import openai
import pytest
from click.testing import CliRunner
from helpers import eventually, make_step
from mesh_client import ask

from services.cli.feedback_command import feedback
from services.cli.router_commands import router as router_group
from services.gateway.keys import KeyStore
from services.router.shadow import SHADOW_KEY
from services.router_training.dataset import load_outcomes
from services.router_training.training import train
from services.router_training.versions import publish, versions
from services.routing.policies.learned import prompt_uniform
from services.routing.policies.routerfile import RouterFile
from services.runtime.feedback import new_feedback, publish_feedback
from services.runtime.settings import REPO_DEPLOY_DIR

pytestmark = pytest.mark.infra

WEAK = "mixtral-8x7b-local"
STRONG = "gpt-4-1106-preview"
WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"
TAG = "mmlu_marketing"


def _rows(url: str, query: str, parameters: dict | None = None) -> list[dict]:
    client = clickhouse_connect.get_client(dsn=url)
    try:
        result = client.query(query, parameters=parameters or {})
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
    finally:
        client.close()


async def _stored(url: str, query: str, at_least: int, parameters: dict | None = None) -> list[dict]:
    """The rows of ``query`` once the accountant has stored at least ``at_least`` of them."""
    return await eventually(
        lambda: rows if len(rows := _rows(url, query, parameters)) >= at_least else None,
        timeout_s=30,
        interval_s=0.2,
        message=f"fewer than {at_least} rows of {query}",
    )


async def test_feedback_from_the_gateway_and_the_cli_is_stored_beside_the_call(openai_settings, start_service, bus):
    settings = openai_settings
    db = settings.subject_prefix
    await start_service("accountant", settings, database=db, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)
    urls: list[str] = []
    await start_service("gateway", settings, port=0, listening=urls.append)
    secret, _ = await (await KeyStore.open(bus)).create("acme", name="feedback")
    client = openai.AsyncOpenAI(base_url=urls[0] + "/v1", api_key=secret, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model=STRONG, messages=[{"role": "user", "content": "Judge me."}]
    )
    completion, call_id, task_id = raw.parse(), raw.headers["x-frugalmesh-call-id"], raw.headers["x-frugalmesh-task"]

    async def post(body: dict, key: str = secret) -> httpx.Response:
        return await client._client.post(
            urls[0] + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}
        )

    # The completion's own id names the call as well as the header does.
    accepted = await post({"call_id": completion.id, "correct": False, "comment": "wrong capital"})
    assert accepted.status_code == 202 and accepted.json()["object"] == "feedback"
    unclear = await post({"call_id": call_id, "correct": True, "score": 0.2})
    assert unclear.status_code == 400 and "exactly one of score" in unclear.json()["error"]["message"]
    assert (await post({"correct": True})).status_code == 400
    assert (await post({"call_id": call_id, "score": 1.5})).status_code == 400
    assert (await post({"call_id": call_id, "score": 1}, key="fm-nobody")).status_code == 401
    env = {"NATS_URL": settings.nats_url, "FRUGALMESH_SUBJECT_PREFIX": db}
    args = ["--task", task_id, "--score", "0.5", "--source", "judge", "--tenant", "acme", "--tag", "capitals"]
    sent = await asyncio.to_thread(CliRunner().invoke, feedback, args, env=env)
    assert sent.exit_code == 0, sent.output
    confused = await asyncio.to_thread(CliRunner().invoke, feedback, ["--task", task_id], env=env)
    assert confused.exit_code != 0 and "--correct/--incorrect" in confused.output
    # The same verdict sent twice (a client's retry) is one row.
    again = new_feedback(tenant="acme", score=1.0, source="validator", call_id=call_id)
    await publish_feedback(bus, again)
    await publish_feedback(bus, again)

    rows = await _stored(
        settings.clickhouse_url,
        f"SELECT source, score, model, tier, task_id, tenant, tag, comment FROM {db}.call_feedback ORDER BY time",
        3,
    )
    assert [(r["source"], r["score"], r["model"], r["tenant"]) for r in rows] == [
        ("user", 0.0, STRONG, "acme"),
        ("judge", 0.5, STRONG, "acme"),
        ("validator", 1.0, STRONG, "acme"),
    ]
    assert rows[0]["comment"] == "wrong capital" and rows[1]["tag"] == "capitals"
    assert {r["task_id"] for r in rows} == {task_id}
    stored = _rows(settings.clickhouse_url, f"SELECT count() AS n FROM {db}.feedback FINAL")
    assert stored == [{"n": 3}]


@pytest.fixture
def recorded(data_dir, tmp_path) -> tuple[Path, list[str]]:
    """Training data (four MMLU domains, 60 prompts each) and recorded prompts of another domain."""
    for domain in ("anatomy", "virology", "college_biology", "econometrics"):
        source = data_dir / "routing" / "mmlu" / f"mmlu_{domain}.csv"
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            kept = [row for _, row in zip(range(60), reader, strict=False)]
        target = tmp_path / "train" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as f:
            writer = csv.DictWriter(f, reader.fieldnames or [])
            writer.writeheader()
            writer.writerows(kept)
    marketing = [r.prompt for r in load_outcomes(data_dir / "routing" / "mmlu" / f"{TAG}.csv")]
    return tmp_path / "train", marketing


async def test_shadow_labels_retrain_a_router_file_the_running_router_picks_up_and_can_roll_back(
    settings, start_service, nc, recorded, tmp_path, data_dir
):
    training, marketing = recorded
    base = train(
        load_outcomes(training),
        weak_model=WEAK,
        strong_model=STRONG,
        weak_column=WEAK_COLUMN,
        strong_column=STRONG,
        policies=["learned"],
        target=0.95,
    )
    base_path = tmp_path / "base.npz"
    base.save(base_path)
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO_DEPLOY_DIR, deploy)
    live = deploy / "routers" / "online.npz"
    publish(dataclasses.replace(base, provenance={"note": "trained offline"}), live)
    shipped = (deploy / "routing.toml").read_text().split("\n[policies]")[0]
    (deploy / "routing.toml").write_text(
        shipped + '\n[policies]\ndefault = "online"\nrouter = "routers/online.npz"\n'
        "online = { shadow_share = 1.0, labels_wanted = 100, retrain_every = 1 }\n"
    )
    used = settings.model_copy(update={"deploy_dir": deploy})
    db = used.subject_prefix
    await start_service("accountant", used, database=db, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("local-inference", used)
    await start_service("cloud-inference", used)
    await start_service("router", used, reload_interval_s=0.1)
    await nc.flush()
    # Prompts the hash routes strong at any weak share below 0.95: before learning, and after a rollback.
    unlikely = iter(p for p in marketing if prompt_uniform(p) > 0.95)

    async def route(prompt: str, index: int) -> str:
        step = make_step(prompt, workflow=TAG, role="answer", task_id=f"t{index}", deadline_in_ms=60_000)
        result = await ask(nc, used, step, timeout_s=60)
        assert result.error is None, result.error
        return result.model

    # Shadow share 1: each call routed strong is also answered by the weak model, judged, labelled.
    pairs = 6
    asked = [next(unlikely) for _ in range(pairs)]
    assert [await route(prompt, index) for index, prompt in enumerate(asked)] == [STRONG] * pairs
    shadows = await _stored(
        used.clickhouse_url,
        f"SELECT model, task_id FROM {db}.usage_events FINAL WHERE key_id = %(k)s",
        pairs,
        {"k": SHADOW_KEY},
    )
    assert sorted((r["model"], r["task_id"]) for r in shadows) == [(WEAK, f"t{i}") for i in range(pairs)]
    labels = await _stored(
        used.clickhouse_url,
        f"SELECT task_id, model, score, source, tag FROM {db}.call_feedback WHERE source = 'label'",
        2 * pairs,
    )
    assert {(r["source"], r["tag"]) for r in labels} == {("label", TAG)}
    # The judge is the recording: each call's label is its model's recorded grade on that prompt.
    recorded = {r.prompt: r.correct for r in load_outcomes(data_dir / "routing" / "mmlu" / f"{TAG}.csv")}
    column = {WEAK: WEAK_COLUMN, STRONG: STRONG}
    assert sorted((r["task_id"], r["model"], r["score"]) for r in labels) == sorted(
        (f"t{i}", model, float(recorded[prompt][column[model]]))
        for i, prompt in enumerate(asked)
        for model in (WEAK, STRONG)
    )

    env = {"CLICKHOUSE_URL": used.clickhouse_url, "FRUGALMESH_HOME": str(tmp_path / "home")}

    def cli(*args: str) -> str:
        outcome = CliRunner().invoke(router_group, list(args), env=env)
        assert outcome.exit_code == 0, outcome.output
        return outcome.output

    trained = await asyncio.to_thread(
        cli, "train", "--from-clickhouse", "--base", str(base_path), "--out", str(live), "--database", db
    )
    assert f"{pairs} labelled pairs ({TAG} {pairs})" in trained and "version 2" in trained
    recorded_labels = RouterFile.load(versions(live)[2]).provenance["labels"]
    assert recorded_labels["pairs"] == pairs and recorded_labels["by_tag"] == {TAG: pairs}

    # A version in which the weak model is as good as the strong one on this tag: the running router
    # routes its calls weak once it has read the file.
    confident = dataclasses.replace(base, tag_outcomes={**base.tag_outcomes, TAG: [1000, 0, 0, 0]}, provenance={})
    publish(confident, live)
    index = iter(range(100, 200))

    async def next_call_is(model: str) -> bool:
        return await route(next(unlikely), next(index)) == model

    await eventually(lambda: next_call_is(WEAK), timeout_s=20, interval_s=0.05)

    rolled = await asyncio.to_thread(cli, "rollback", "--router", str(live), "--to", "2")
    assert "version 2 again" in rolled
    await eventually(lambda: next_call_is(STRONG), timeout_s=20, interval_s=0.05)
    listed = (await asyncio.to_thread(cli, "versions", "--router", str(live))).splitlines()
    assert len(listed) == 3 and listed[1].startswith("* v0002") and f"{pairs} pairs" in listed[1]
