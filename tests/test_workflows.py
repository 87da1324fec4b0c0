"""Workflow files: the shipped ones load, and every kind of broken workflow is refused with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.planner.workflow import WorkflowError, load_workflow, load_workflows, parse_workflow, render

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

MODEL_STEP = """
[[steps]]
id = "{id}"
role = "answer"
artifact = "answer"
needs = {needs}
messages = [{{ role = "user", content = "{{goal}}" }}]
"""


def workflow(*steps: str, header: str = 'name = "w"') -> str:
    return header + "\n" + "".join(steps)


def step(id: str, needs: list[str] | None = None) -> str:
    return MODEL_STEP.format(id=id, needs=str(needs or []).replace("'", '"'))


def test_shipped_workflows_load():
    workflows = load_workflows(REPO / "deploy" / "workflows")
    assert set(workflows) >= {"answer", "draft-review"}
    answer = workflows["answer"]
    assert [(s.id, s.role, s.artifact) for s in answer.steps] == [("answer", "answer", "answer")]
    review = workflows["draft-review"]
    assert [s.id for s in review.steps] == ["draft", "review", "final"]
    assert review.final.kind == "select" and review.final.needs == ["draft", "review"]
    # Replay backends key on the goal: it is the first user message of every model step.
    for wf in workflows.values():
        for s in wf.steps:
            if s.kind == "model":
                assert next(m.content for m in s.messages if m.role == "user") == "{goal}"


def test_a_valid_dag_parses():
    wf = parse_workflow(workflow(step("a"), step("b"), step("c", ["a", "b"])))
    assert [s.needs for s in wf.steps] == [[], [], ["a", "b"]]
    assert wf.final.id == "c"


def test_cycle_is_refused():
    with pytest.raises(WorkflowError, match="cycle"):
        parse_workflow(workflow(step("a", ["c"]), step("b", ["a"]), step("c", ["b"])))
    with pytest.raises(WorkflowError, match="needs itself"):
        parse_workflow(workflow(step("a", ["a"])))


def test_unknown_need_is_refused():
    with pytest.raises(WorkflowError, match="step 'b': needs unknown steps: nope"):
        parse_workflow(workflow(step("a"), step("b", ["nope"])))


def test_duplicate_ids_and_bad_ids_are_refused():
    with pytest.raises(WorkflowError, match="duplicate step ids: a"):
        parse_workflow(workflow(step("a"), step("a")))
    with pytest.raises(WorkflowError, match="step id"):
        parse_workflow(workflow(step("goal")))


def test_unknown_artifact_type_is_refused():
    text = workflow(step("a")).replace('artifact = "answer"', 'artifact = "poem"')
    with pytest.raises(WorkflowError, match="unknown artifact type 'poem'"):
        parse_workflow(text)


def test_first_user_message_must_be_the_goal():
    text = workflow(step("a")).replace('"{goal}"', '"Question: {goal}"')
    with pytest.raises(WorkflowError, match="first user message must be exactly '\\{goal\\}'"):
        parse_workflow(text)


def test_placeholders_must_name_the_goal_or_a_need():
    text = workflow(
        step("a"),
        step("b"),
        '[[steps]]\nid = "c"\nrole = "r"\nartifact = "text"\nneeds = ["a"]\n'
        'messages = [{ role = "user", content = "{goal}" }, { role = "user", content = "{a} {b}" }]\n',
    )
    with pytest.raises(WorkflowError, match="placeholder \\{b\\}"):
        parse_workflow(text)


def test_select_step_needs_a_candidate_and_a_review():
    select = '[[steps]]\nid = "final"\nkind = "select"\nartifact = "answer"\nneeds = ["a", "b"]\n'
    with pytest.raises(WorkflowError, match="must produce a 'review'"):
        parse_workflow(workflow(step("a"), step("b"), select))


def test_unknown_fields_bad_toml_and_empty_are_refused():
    with pytest.raises(WorkflowError, match="steps"):
        parse_workflow(workflow(step("a")) + "bogus = 1\n")
    with pytest.raises(WorkflowError, match=r"w\.toml"):
        parse_workflow("name = ", "w.toml")
    with pytest.raises(WorkflowError, match="at least one step"):
        parse_workflow('name = "w"\nsteps = []\n')
    with pytest.raises(WorkflowError, match="max_fanout"):
        parse_workflow(workflow(step("a"), header='name = "w"\nmax_fanout = 0'))


def test_name_must_match_file(tmp_path):
    path = tmp_path / "other.toml"
    path.write_text(workflow(step("a")))
    with pytest.raises(WorkflowError, match="must match the file name 'other'"):
        load_workflow(path)


def test_render_fills_known_placeholders_only():
    values = {"goal": "What is {x}?", "draft": "42"}
    assert render('{goal} / {draft} / {other} / {"json": 1}', values) == 'What is {x}? / 42 / {other} / {"json": 1}'


def test_a_looping_step_needs_a_valid_pattern_and_bound():
    looping = workflow(step("a")).replace("needs = []", 'needs = []\nretry_if = "RETRY"\nmax_loops = 3')
    assert (parse_workflow(looping).steps[0].retry_if, parse_workflow(looping).steps[0].max_loops) == ("RETRY", 3)
    with pytest.raises(WorkflowError, match="retry_if is not a regular expression"):
        parse_workflow(looping.replace('"RETRY"', '"(unclosed"'))
    with pytest.raises(WorkflowError, match="max_loops must be at least 1, not 0"):
        parse_workflow(looping.replace("max_loops = 3", "max_loops = 0"))
    select = '[[steps]]\nid = "final"\nkind = "select"\nartifact = "answer"\nneeds = ["a", "r"]\nretry_if = "x"\n'
    review = (
        '[[steps]]\nid = "r"\nrole = "review"\nartifact = "review"\nneeds = ["a"]\n'
        'messages = [{ role = "user", content = "{goal}" }]\n'
    )
    with pytest.raises(WorkflowError, match="takes no role, messages or retry_if"):
        parse_workflow(workflow(step("a"), review, select))
