"""The wire contract: JSON Schemas are current, messages round-trip, versions are carried."""

import msgspec
import pytest

from schemas.export import JSON_DIR, render, undocumented_fields
from schemas.messages import SCHEMA_VERSION, WIRE_MESSAGES, Task
from schemas.subjects import Subjects, token

pytestmark = pytest.mark.unit


def test_checked_in_json_schemas_are_current():
    rendered = render()
    assert set(rendered) == {p.name for p in JSON_DIR.glob("*.json")}, "run `frugalmesh schemas export`"
    for name, text in rendered.items():
        assert (JSON_DIR / name).read_text() == text, f"{name} is stale: run `frugalmesh schemas export`"


def test_every_message_carries_the_schema_version():
    for message in WIRE_MESSAGES:
        assert "v" in message.__struct_fields__, message.__name__
    assert msgspec.json.decode(b'{"id": "t1"}', type=Task).v == SCHEMA_VERSION


def test_unknown_fields_are_ignored_for_forward_compatibility():
    task = msgspec.json.decode(b'{"id": "t1", "goal": "g", "added_later": 1}', type=Task)
    assert task.goal == "g"


def test_wrong_types_are_refused_with_the_field_named():
    with pytest.raises(msgspec.ValidationError, match="budget_usd"):
        msgspec.json.decode(b'{"id": "t1", "budget_usd": "lots"}', type=Task)


def test_subject_tokens_refuse_dots_and_wildcards():
    subjects = Subjects("mesh")
    assert subjects.usage("acme") == "mesh.usage.acme"
    for bad in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(ValueError):
            token(bad)


def test_every_field_of_every_wire_message_is_documented():
    """Field meaning lives in the schema, so an author in another language reads what Python's does."""
    assert undocumented_fields() == []
