"""The whole mesh as a user runs it: `frugalmesh up` (six service processes on the session's real
nats-server and ClickHouse), `frugalmesh submit`, `frugalmesh sql`, and garbage on every subject."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import clickhouse_connect
import msgspec
import nats
import pytest

from schemas.messages import DeadLetter
from schemas.subjects import HEADER_MSG_ID, STREAM_DLQ, STREAM_TASKS, STREAM_USAGE, Subjects
from services.runtime.data import load_recorded_outcomes
from services.runtime.identities import Identity
from services.runtime.settings import MeshSettings

# `frugalmesh up` starts the whole mesh as subprocesses, the real local model's engine among them
# (not the session's, so no fixture says so): 10 to 20 s for the module.
pytestmark = [pytest.mark.infra, pytest.mark.engine, pytest.mark.slow]

FRUGALMESH = [shutil.which("frugalmesh")] if shutil.which("frugalmesh") else [sys.executable, "-m", "services.cli.main"]


@pytest.fixture(scope="module")
def mesh(infra, data_dir, tmp_path_factory):
    """`frugalmesh up` in a subprocess, on the session's ClickHouse, with its own nats-server, so with the
    mesh's identities on: every service on its own credential, the CLI on the operator's (stack.json)."""
    home = tmp_path_factory.mktemp("home")
    prefix = "e2e" + uuid.uuid4().hex[:8]
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("NATS_URL", "FRUGALMESH_NATS_CREDS")},
        "CLICKHOUSE_URL": infra[1],
        "FRUGALMESH_HOME": str(home),
        "FRUGALMESH_SUBJECT_PREFIX": prefix,
        "FRUGALMESH_DATA": str(data_dir),
    }
    up = subprocess.Popen(
        FRUGALMESH + ["up", "--nats-port", "-1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in up.stdout:
        lines.append(line)
        if "frugalmesh is up" in line:
            break
    else:
        pytest.fail("frugalmesh up did not come up:\n" + "".join(lines))
    state = json.loads((home / "stack.json").read_text())
    yield {
        "env": env,
        "home": home,
        "prefix": prefix,
        "up": up,
        "banner": "".join(lines),
        "nats_url": state["nats_url"],
    }
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped." in out
    assert not (home / "stack.json").exists()


def frugalmesh(mesh, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(FRUGALMESH + list(args), env=mesh["env"], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gsm8k(data_dir):
    return [r for r in load_recorded_outcomes(data_dir) if r.dataset == "gsm8k"]


def usage_rows(clickhouse_url: str, task_id: str, expected: int) -> list[tuple]:
    """The task's usage rows, once the accountant has ingested ``expected`` of them (or 30 s)."""
    client = clickhouse_connect.get_client(dsn=clickhouse_url)
    deadline = time.monotonic() + 30
    while True:
        rows = client.query(
            "SELECT event_id, model, tier, outcome, input_tokens, output_tokens, cost_usd "
            "FROM usage_events FINAL WHERE task_id = %(t)s",
            parameters={"t": task_id},
        ).result_rows
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def submit(mesh, goal: str, *options: str) -> tuple[str, list[str], subprocess.CompletedProcess]:
    result = frugalmesh(mesh, "submit", goal, *options)
    lines = result.stdout.splitlines()
    task_id = lines[0].removeprefix("task ").strip()
    return task_id, lines, result


def test_up_reports_where_everything_listens(mesh):
    banner = mesh["banner"]
    assert "NATS" in banner and "ClickHouse" in banner and "Identities" in banner
    for service in ("planner", "router", "local-inference", "cloud-inference", "artifact-store", "accountant"):
        assert service in banner


def test_up_serves_a_real_local_model(mesh, infra):
    """The engine `up` started generates for real: a task pinned to it runs on SmolLM2 and is
    metered with the engine's own token counts, priced by its hardware profile."""
    assert "Local model http://127.0.0.1:" in mesh["banner"]
    task_id, lines, result = submit(
        mesh, "Say hello in one short sentence.", "--workflow", "answer", "--allow-model", "smollm2-135m"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[-1].strip(), "no answer printed"
    [row] = usage_rows(infra[1], task_id, expected=1)
    _, model, tier, outcome, tokens_in, tokens_out, cost = row
    assert (model, tier, outcome) == ("smollm2-135m", "local", "ok")
    assert tokens_in > 0 and tokens_out > 0 and cost > 0


def test_answer_task_runs_through_all_six_services_and_is_metered_once_per_call(mesh, infra, gsm8k):
    record = gsm8k[0]
    task_id, lines, result = submit(mesh, record.prompt, "--workflow", "answer")
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = [line.split()[0] for line in lines[1:] if line.startswith("  ")]
    assert kinds[:2] == ["accepted", "planned"] and kinds[-1] == "done"
    assert "step_done" in kinds
    rows = usage_rows(infra[1], task_id, expected=1)
    assert len(rows) == 1, rows
    event_id, model, tier, outcome, tokens_in, tokens_out, cost = rows[0]
    assert outcome == "ok" and tokens_in > 0 and tokens_out > 0
    # The recorded answer of the routed model is what the user gets back.
    column = {
        "mixtral-8x7b-local": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "gpt-4-1106-preview": "gpt-4-1106-preview",
    }[model]
    assert record.responses[column].strip()[:60] in result.stdout
    # The price table, applied to the metered tokens, is the metered cost.
    from schemas.messages import Usage
    from services.runtime.catalog import Catalog
    from services.runtime.settings import MeshSettings

    spec = Catalog.load(MeshSettings().deploy_dir).model(model)
    assert float(cost) == pytest.approx(spec.cost(Usage(input_tokens=tokens_in, output_tokens=tokens_out)), rel=1e-9)


def test_draft_review_yields_three_artifacts_and_two_metered_calls(mesh, infra, gsm8k):
    task_id, lines, result = submit(mesh, gsm8k[1].prompt, "--workflow", "draft-review")
    assert result.returncode == 0, result.stdout + result.stderr
    done_steps = [line.split()[1] for line in lines if line.strip().startswith("step_done")]
    assert sorted(done_steps) == ["[draft]", "[final]", "[review]"]
    rows = usage_rows(infra[1], task_id, expected=2)
    assert sorted(r[2] for r in rows) == ["frontier", "local"]  # cheap draft, frontier review
    query = f"SELECT count() AS calls FROM usage_events FINAL WHERE task_id = '{task_id}'"
    sql = frugalmesh(mesh, "sql", query, "--format", "tsv")
    assert sql.returncode == 0, sql.stderr
    assert sql.stdout.splitlines() == ["calls", "2"]


def test_unknown_workflow_fails_with_the_reason(mesh):
    _, lines, result = submit(mesh, "anything", "--workflow", "no-such-workflow")
    assert result.returncode == 1
    assert any("failed" in line and "no-such-workflow" in line for line in lines)


GARBAGE = b"\x00not json{"
SCHEMA_INVALID = b'{"id": 5, "goal": ["not", "a", "string"]}'


async def test_garbage_on_every_subject_goes_to_the_dlq_and_services_keep_serving(mesh, gsm8k):
    subjects = Subjects(mesh["prefix"])
    # The accountant's credential: the one that may publish on every subject the services consume.
    creds = mesh["home"] / "creds" / Identity("service", "accountant").file_name
    nc = await nats.connect(mesh["nats_url"], **MeshSettings(nats_creds=creds).nats_options())
    js = nc.jetstream()
    targets = {
        "planner": ("js", subjects.task_submit("default"), subjects.stream(STREAM_TASKS)),
        "accountant": ("js", subjects.usage("default"), subjects.stream(STREAM_USAGE)),
        "router": ("req", subjects.step_request, None),
        "local-inference": ("req", subjects.infer_local("mixtral-8x7b-local"), None),
        "cloud-inference": ("req", subjects.infer_cloud("openai"), None),
        "artifact-store": ("req", subjects.artifact_put("default"), None),
    }
    for service, (kind, subject, stream) in targets.items():
        for n, payload in enumerate((GARBAGE, SCHEMA_INVALID)):
            if kind == "js":
                await js.publish(subject, payload, stream=stream, headers={HEADER_MSG_ID: f"bad-{service}-{n}"})
            else:
                reply = await nc.request(subject, payload, timeout=5)
                assert msgspec.json.decode(reply.data)["error"]["kind"] == "invalid"

    letters: dict[str, list[DeadLetter]] = {}
    sub = await js.subscribe(subjects.dlq_all, stream=subjects.stream(STREAM_DLQ), ordered_consumer=True)
    deadline = time.monotonic() + 20
    while sum(len(v) for v in letters.values()) < 2 * len(targets) and time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=1)
        except TimeoutError:
            continue
        letter = msgspec.json.decode(msg.data, type=DeadLetter)
        letters.setdefault(letter.service, []).append(letter)
    await sub.unsubscribe()
    assert set(letters) == set(targets)
    for service, received in letters.items():
        assert sorted(letter.data for letter in received) == sorted([GARBAGE, SCHEMA_INVALID]), service
        assert all(letter.error for letter in received)

    await nc.close()
    # ...and the mesh still serves real work afterwards.
    _, _, result = submit(mesh, gsm8k[2].prompt)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_mistakes_say_what_was_wrong(mesh):
    result = frugalmesh(mesh, "sql", "SELEKT nonsense")
    assert result.returncode != 0 and "Error" in result.stderr
    result = frugalmesh(mesh, "run", "no-such-service")
    assert result.returncode == 2 and "no-such-service" in result.stderr
