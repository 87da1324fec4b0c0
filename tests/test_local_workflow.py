"""The ``triage`` workflow with the real local tier: SmolLM2-135M on the embedded CPU engine labels
every ticket (one structured call per ticket, validated against the ``ticket_label`` schema), one
frontier call writes the note. Every service runs in-process on the session's real nats-server
and ClickHouse: planner, router, local-inference, cloud-inference, artifact store, accountant.

The frontier (provider ``openai``) and mid (provider ``together``) tiers are loopback fakes of the
OpenAI wire protocol (tests/fakes/openai_server.py): their replay backends only answer recorded
GSM8K/MMLU prompts, and a triage note is not one. The local tier is the real model; assertions on
it are about structure (labels from the enum, valid artifacts, real token counts), never wording.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import get_args

import pytest
from click.testing import CliRunner
from fakes.deploy import fake_providers_deploy
from fakes.openai_server import Behaviour, FakeOpenAI
from mesh_client import artifact, put_artifact, submit, usage_rows

from schemas.artifacts import (
    ArtifactError,
    TicketCategory,
    parse_structured,
    response_schema,
    validate_body,
)
from schemas.messages import (
    Artifact,
    ArtifactRef,
    Task,
)
from services.planner.config import PlannerConfig
from services.planner.preflight import Preflight
from services.planner.workflow import WorkflowError, load_workflows, parse_workflow
from services.runtime.bus import now_ms
from services.runtime.settings import REPO_DEPLOY_DIR

LOCAL = "smollm2-135m"
MID = "mixtral-8x7b"
FRONTIER = "gpt-4-1106-preview"
GOAL = "Triage today's support tickets."
TICKETS = [
    "I was charged twice for my subscription this month, please refund the extra payment.",
    "The app crashes every time I open the settings page on Android.",
    "I can't log in: the password reset email never arrives and my whole team is locked out!",
    "It would be great if you added a dark mode.",
    "Your CSV export drops every row after 1000 and we lost a day of data.",
    # The same ticket twice: one call, one artifact, in both places of the batch.
    "I was charged twice for my subscription this month, please refund the extra payment.",
]
NOTE = "Urgent: the login outage and the CSV export data loss. Billing: 1 refund."
MID_LABEL = '{"label":"bug","urgent":true}'


@pytest.fixture
def frontier() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(Behaviour(reply=NOTE)) as server:
        yield server


@pytest.fixture
def mid() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(Behaviour(reply=MID_LABEL)) as server:
        yield server


@pytest.fixture
def mesh_settings(engine_settings, frontier, mid, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("TOGETHER_API_KEY", "sk-test")
    # The frontier (provider openai) and the mid tier (provider together) are the loopback fakes.
    deploy = fake_providers_deploy(tmp_path / "deploy", {"openai": frontier.url, "together": mid.url})
    return engine_settings.model_copy(update={"deploy_dir": deploy})


@pytest.fixture
async def mesh(mesh_settings, start_service):
    """All six services, on the real engine and the fakes."""
    s = mesh_settings
    await start_service("accountant", s, database=s.subject_prefix)
    await start_service("artifact-store", s)
    await start_service("router", s)
    await start_service("local-inference", s)
    await start_service("cloud-inference", s)
    await start_service("planner", s)
    return s


# The tenant of the triage tasks, and so of their inputs and of every artifact they make.
TENANT = "acme"


async def put_tickets(nc, settings, tickets: list[str]) -> list[ArtifactRef]:
    refs = []
    for text in tickets:
        artifact = Artifact(type="text", tenant=TENANT, step_id="input", body={"text": text}, created_ms=now_ms())
        reply = await put_artifact(nc, settings, artifact)
        assert reply.ref is not None, reply.error
        refs.append(reply.ref)
    return refs


def triage_task(refs: list[ArtifactRef], **fields) -> Task:
    return Task(
        id=uuid.uuid4().hex[:12],
        tenant=TENANT,
        workflow="triage",
        goal=GOAL,
        inputs=refs,
        deadline_s=120,
        submitted_ms=now_ms(),
        **fields,
    )


LABEL_COLUMNS = (
    "step_id, model, tier, outcome, usage_source, input_tokens, output_tokens, cost_usd, hardware_profile, time"
)


async def task_rows(clickhouse_url: str, database: str, task_id: str, expected: int) -> list[dict]:
    return await usage_rows(
        clickhouse_url, database, "task_id = %(t)s", {"t": task_id}, columns=LABEL_COLUMNS, expected=expected
    )


# -- end to end, on the real engine --


@pytest.mark.infra
@pytest.mark.engine
async def test_triage_labels_every_ticket_locally_and_synthesises_once_on_the_frontier(
    mesh, nc, frontier, mid, clickhouse_url
):
    settings = mesh
    refs = await put_tickets(nc, settings, TICKETS)
    assert refs[0] == refs[-1]  # content-addressed: the duplicate ticket is the same input
    task = triage_task(refs)

    events = await submit(nc, settings, task, timeout_s=90)

    assert events[-1].kind == "done", events[-1].detail
    assert [(e.kind, e.step_id) for e in events] == [
        ("accepted", None),
        ("planned", None),
        ("step_started", "label"),
        ("step_done", "label"),
        ("step_started", "note"),
        ("step_done", "note"),
        ("done", None),
    ]
    distinct = len(set(TICKETS))
    assert events[-1].calls == distinct + 1

    # The batch: one validated label per ticket, in input order, the duplicate sharing its artifact.
    batch = await artifact(nc, settings, events[3].artifact.id, TENANT)
    assert batch.type == "batch" and batch.body["of"] == "ticket_label"
    assert batch.body["inputs"] == [r.id for r in refs]
    assert len(batch.body["items"]) == len(TICKETS) and batch.body["items"][0] == batch.body["items"][-1]
    labels = {}
    for position, item_id in enumerate(batch.body["items"][:distinct]):
        item = await artifact(nc, settings, item_id, TENANT)
        assert item.type == "ticket_label" and validate_body("ticket_label", 1, item.body) == item.body
        assert item.body["label"] in get_args(TicketCategory) and isinstance(item.body["urgent"], bool)
        assert (item.body["model"], item.body["input"]) == (LOCAL, refs[position].id)
        assert item.parents == [refs[position].id] and item.step_id == f"label[{position}]"
        assert len(item.calls) == 1 and item.cost_usd > 0
        labels[refs[position].id] = item.body

    # One frontier call saw every ticket with its label, and wrote the answer.
    note = await artifact(nc, settings, events[-1].artifact.id, TENANT)
    assert note.type == "answer" and note.body["text"] == NOTE and note.body["model"] == FRONTIER
    assert note.parents == [batch.id]
    assert len(frontier.requests) == 1 and mid.requests == []
    sent = frontier.requests[0].body
    assert sent["model"] == FRONTIER
    prompt = "\n".join(m["content"] for m in sent["messages"])
    for ticket in TICKETS:
        assert ticket in prompt
    for body in labels.values():
        assert json.dumps({"label": body["label"], "urgent": body["urgent"]}, separators=(",", ":")) in prompt

    # Metered: one row per call; the local ones with the engine's own token counts.
    rows = await task_rows(clickhouse_url, settings.subject_prefix, task.id, expected=distinct + 1)
    local = [r for r in rows if r["model"] == LOCAL]
    assert sorted(r["step_id"] for r in local) == sorted(f"label[{i}]" for i in range(distinct))
    for row in local:
        assert (row["tier"], row["outcome"], row["usage_source"], row["hardware_profile"]) == (
            "local",
            "ok",
            "provider",
            "cpu-2core",
        )
        assert row["input_tokens"] > 0 and 0 < row["output_tokens"] <= 48 and row["cost_usd"] > 0
    [synthesis] = [r for r in rows if r["model"] == FRONTIER]
    assert (synthesis["step_id"], synthesis["tier"], synthesis["outcome"]) == ("note", "frontier", "ok")
    assert len(rows) == distinct + 1


@pytest.mark.infra
@pytest.mark.engine
async def test_an_invalid_local_output_is_retried_then_escalated_to_the_mid_tier(
    mesh, nc, frontier, mid, clickhouse_url
):
    """Four output tokens cannot hold a ticket_label: the grammar keeps the engine's JSON valid
    as far as it goes, but it is cut off, so it fails validation every time."""
    settings = mesh
    tickets = TICKETS[:2]
    refs = await put_tickets(nc, settings, tickets)
    task = triage_task(refs, max_tokens=4)

    events = await submit(nc, settings, task, timeout_s=90)

    assert events[-1].kind == "done", events[-1].detail
    for position in range(len(tickets)):
        step_id = f"label[{position}]"
        mine = [e for e in events if e.step_id == step_id]
        assert [e.kind for e in mine] == ["step_started", "escalated"]
        retry, escalated = mine
        assert retry.detail.startswith(f"retry 1 of 1 on {LOCAL}: the output is invalid: not valid JSON")
        assert escalated.detail.startswith(f"to tier mid ({MID}): the output of {LOCAL} is invalid after 1 retries")

    label_done = next(e for e in events if e.kind == "step_done" and e.step_id == "label")
    batch = await artifact(nc, settings, label_done.artifact.id, TENANT)
    for position, item_id in enumerate(batch.body["items"]):
        item = await artifact(nc, settings, item_id, TENANT)
        assert item.body == {"input": refs[position].id, "model": MID, "label": "bug", "urgent": True}
        assert len(item.calls) == 3  # the first answer, the retry and the escalation

    # The mid model got the step's own prompt and schema: the original request, not the retry.
    assert len(mid.requests) == len(tickets)
    for seen in mid.requests:
        body = seen.body
        assert body["model"] == MID and body["max_tokens"] == 4
        assert body["response_format"]["json_schema"]["schema"] == response_schema("ticket_label")
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]

    rows = await task_rows(clickhouse_url, settings.subject_prefix, task.id, expected=3 * len(tickets) + 1)
    for position in range(len(tickets)):
        calls = [r for r in rows if r["step_id"] == f"label[{position}]"]
        assert [(r["model"], r["tier"]) for r in calls] == [(LOCAL, "local"), (LOCAL, "local"), (MID, "mid")]
        first, again, _ = calls
        assert all(r["outcome"] == "ok" and r["usage_source"] == "provider" for r in calls)
        assert first["output_tokens"] == again["output_tokens"] == 4
        # The retry showed the model its reply and the validation error: a longer prompt.
        assert again["input_tokens"] > first["input_tokens"] > 0


@pytest.mark.infra
@pytest.mark.engine
async def test_escalation_never_leaves_the_tasks_allow_list(mesh, nc, frontier, mid, clickhouse_url):
    settings = mesh
    refs = await put_tickets(nc, settings, TICKETS[:1])
    task = triage_task(refs, max_tokens=4, allow_models=[LOCAL, FRONTIER])

    events = await submit(nc, settings, task, timeout_s=90)

    assert events[-1].kind == "failed"
    assert "no mid model is allowed to escalate to" in events[-1].detail
    assert "escalated" not in [e.kind for e in events]
    assert mid.requests == [] and frontier.requests == []
    rows = await task_rows(clickhouse_url, settings.subject_prefix, task.id, expected=2)
    assert [r["model"] for r in rows] == [LOCAL, LOCAL]


@pytest.mark.infra
@pytest.mark.engine
@pytest.mark.slow  # six generations and a note on the real model, through the CLI: about 10 s
async def test_frugalmesh_submit_items_pinned_to_the_local_model_runs_everything_on_it(
    mesh, nc, frontier, mid, clickhouse_url, tmp_path, monkeypatch
):
    """The README's local-only run: `frugalmesh submit --item ... --allow-model smollm2-135m`; the
    note runs on the local model too (the task's pin leaves the frontier no model). As a tenant of
    its own: the items are stored, and the answer read back, as that tenant's."""
    from services.cli.main import cli

    settings = mesh
    monkeypatch.setenv("NATS_URL", settings.nats_url)
    monkeypatch.setenv("FRUGALMESH_SUBJECT_PREFIX", settings.subject_prefix)
    monkeypatch.setenv("FRUGALMESH_HOME", str(tmp_path / "home"))
    tickets = TICKETS[1:3]
    args = ["submit", "--workflow", "triage", "--tenant", TENANT, "--allow-model", LOCAL, "--deadline", "120", GOAL]
    for ticket in tickets:
        args[1:1] = ["--item", ticket]
    # The command runs its own event loop: in a thread, beside the services in this one.
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    task_id = lines[0].removeprefix("task ").strip()
    kinds = [line.split()[0] for line in lines[1:] if line.startswith("  ")]
    assert kinds == ["accepted", "planned", "step_started", "step_done", "step_started", "step_done", "done"]
    rows = await task_rows(clickhouse_url, settings.subject_prefix, task_id, expected=len(tickets) + 1)
    assert sorted(r["step_id"] for r in rows) == sorted([*(f"label[{i}]" for i in range(len(tickets))), "note"])
    assert all(r["model"] == LOCAL and r["usage_source"] == "provider" and r["output_tokens"] > 0 for r in rows)
    assert frontier.requests == [] and mid.requests == []


# -- the planner's refusals: no engine needed --


@pytest.fixture
async def planner_only(settings, start_service):
    await start_service("artifact-store", settings)
    await start_service("planner", settings)
    return settings


@pytest.mark.infra
async def test_a_pin_that_excludes_the_steps_model_is_refused_before_any_call(planner_only, nc):
    settings = planner_only
    refs = await put_tickets(nc, settings, TICKETS[:2])
    # The replay model is cheaper, but the label step is pinned to smollm2-135m: the intersection is empty.
    task = triage_task(refs, allow_models=["mixtral-8x7b-local", FRONTIER])
    events = await submit(nc, settings, task, timeout_s=10)
    assert [e.kind for e in events] == ["accepted", "refused", "failed"]
    assert "no known model is allowed (allow_models=[])" in events[-1].detail and events[-1].calls == 0


@pytest.mark.infra
async def test_a_task_without_inputs_fails_at_once(planner_only, nc):
    settings = planner_only
    events = await submit(nc, settings, triage_task([]), timeout_s=10)
    assert [e.kind for e in events] == ["accepted", "failed"]
    assert "runs step 'label' once per task input, and the task has no inputs" in events[-1].detail


# -- the workflow, the schema and the estimate, as data --


@pytest.mark.unit
def test_the_shipped_triage_workflow_pins_its_labels_and_escalates_to_mid():
    workflow = load_workflows(REPO_DEPLOY_DIR / "workflows")["triage"]
    label, note = workflow.steps
    assert (label.for_each, label.allow_models, label.artifact, label.escalate_to) == (
        "inputs",
        [LOCAL],
        "ticket_label",
        "mid",
    )
    assert label.retries_when_invalid == 1
    assert note.needs == ["label"] and note.artifact == "answer" and workflow.final is note


@pytest.mark.unit
def test_the_response_schema_is_the_models_fields_and_validation_is_the_artifacts():
    schema = response_schema("ticket_label")
    assert set(schema["properties"]) == {"label", "urgent"} and schema["required"] == ["label", "urgent"]
    assert sorted(schema["properties"]["label"]["enum"]) == sorted(get_args(TicketCategory))
    assert "$ref" not in json.dumps(schema) and schema["additionalProperties"] is False
    body = parse_structured("ticket_label", '{ "label": "bug", "urgent": true, "model": "me" }', input="i", model="m")
    assert body == {"input": "i", "model": "m", "label": "bug", "urgent": True}
    assert parse_structured("ticket_label", '```json\n{"label": "other", "urgent": false}\n```')["label"] == "other"
    for bad, why in [
        ('{"label": "', "not valid JSON"),
        ('{"label": "refund", "urgent": true}', "Invalid enum value 'refund'"),
        ('{"label": "bug"}', "missing required field `urgent`"),
        ('{"label": "bug", "urgent": true, "reason": "x"}', "unknown field `reason`"),
        ("[]", "expected a JSON object"),
    ]:
        with pytest.raises(ArtifactError, match=why):
            parse_structured("ticket_label", bad)
    with pytest.raises(ArtifactError):
        response_schema("answer")


STEP = """
[[steps]]
id = "s"
role = "classify"
artifact = "{artifact}"
{extra}
messages = [{{ role = "user", content = "{{goal}}" }}, {{ role = "user", content = "{content}" }}]
"""


def one_step(artifact: str = "ticket_label", extra: str = 'for_each = "inputs"', content: str = "{item}") -> str:
    return 'name = "w"\n' + STEP.format(artifact=artifact, extra=extra, content=content)


@pytest.mark.unit
def test_for_each_pins_and_escalation_are_checked_when_loaded():
    step = parse_workflow(
        one_step(extra='for_each = "inputs"\nescalate_to = "mid"\nallow_models = ["smollm2-135m"]')
    ).steps[0]
    assert (step.for_each, step.escalate_to, step.allow_models) == ("inputs", "mid", [LOCAL])
    cases = [
        (one_step(content="no item here"), "must use \\{item\\}"),
        (one_step(extra=""), "placeholder \\{item\\} needs for_each"),
        (
            one_step(artifact="answer", extra='for_each = "inputs"\nescalate_to = "mid"'),
            "need a structured artifact type",
        ),
        (one_step(extra='for_each = "inputs"\nescalate_to = "top"'), "escalate_to"),
        (one_step(extra='for_each = "inputs"\nallow_models = []'), "allow_models must name at least one model"),
        (one_step(extra='for_each = "inputs"\ninvalid_retries = -1'), "invalid_retries must not be negative"),
        (one_step(extra='for_each = "everything"'), "for_each"),
        (one_step(extra='retry_if = "x"', content="more"), "a structured step takes no retry_if"),
    ]
    for text, why in cases:
        with pytest.raises(WorkflowError, match=why):
            parse_workflow(text)
    select = '[[steps]]\nid = "final"\nkind = "select"\nartifact = "answer"\nneeds = ["a", "r"]\n'
    mapped = STEP.replace('id = "s"', 'id = "a"').format(
        artifact="answer", extra='for_each = "inputs"', content="{item}"
    )
    review = (
        '[[steps]]\nid = "r"\nrole = "review"\nartifact = "review"\n'
        'messages = [{ role = "user", content = "{goal}" }]\n'
    )
    with pytest.raises(WorkflowError, match="cannot select from a step run for each input"):
        parse_workflow('name = "w"\n' + mapped + review + select)


@pytest.mark.unit
def test_a_pin_to_a_model_the_catalogue_lacks_is_reported_and_refused(data_dir):
    workflow = parse_workflow(one_step(extra='for_each = "inputs"\nallow_models = ["smollm3"]'))
    preflight = Preflight.load(REPO_DEPLOY_DIR, data_dir, PlannerConfig.load(REPO_DEPLOY_DIR))
    assert preflight.check({"w": workflow}) == [
        "workflow 'w', step 's': allow_models names models not in the catalogue: ['smollm3']"
    ]
    assert preflight.check(load_workflows(REPO_DEPLOY_DIR / "workflows")) == []
    from services.routing.table import PinningError

    with pytest.raises(PinningError):
        preflight.steps(workflow, GOAL, None, None, items=["a ticket"])


@pytest.mark.unit
def test_the_estimate_prices_one_local_call_per_distinct_input(data_dir):
    workflow = load_workflows(REPO_DEPLOY_DIR / "workflows")["triage"]
    preflight = Preflight.load(REPO_DEPLOY_DIR, data_dir, PlannerConfig.load(REPO_DEPLOY_DIR))
    few = preflight.steps(workflow, GOAL, None, None, items=TICKETS[:2], fanout=9)
    many = preflight.steps(workflow, GOAL, None, None, items=TICKETS[:2] * 10 + [str(i) for i in range(10)], fanout=9)
    (label, note), (label_many, _) = few, many
    assert (label.model.name, label.calls, label.max_tokens) == (LOCAL, 2, 96)
    assert note.model.name == FRONTIER and note.calls == 1
    assert label_many.calls == 30 and label_many.step.cost_usd > 10 * label.step.cost_usd
    # 30 calls at most 9 at a time: four waves of the local model's latency.
    assert label_many.step.latency_s == pytest.approx(4 * label.step.latency_s)
    assert note.input_tokens > 0
    # Pinned by the task to the frontier alone, the pinned label step has no model: refused.
    from services.routing.table import PinningError

    with pytest.raises(PinningError):
        preflight.steps(workflow, GOAL, [FRONTIER], None, items=TICKETS[:1])


@pytest.mark.unit
def test_frugalmesh_estimate_triage(data_dir, monkeypatch):
    from services.cli.main import cli

    monkeypatch.setenv("FRUGALMESH_DATA", str(data_dir))
    runner = CliRunner()
    result = runner.invoke(cli, ["estimate", "triage", "--goal", GOAL, "--item", TICKETS[0], "--item", TICKETS[1]])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and FRONTIER in result.output
    bare = runner.invoke(cli, ["estimate", "triage", "--budget", "0.000001"])
    assert bare.exit_code == 1 and "priced for one empty input" in bare.output and "does not fit" in bare.output
