"""The body schema of each artifact type, and the content address of an artifact.

An ``Artifact`` (schemas/messages.py) carries its body as a plain JSON object so that any agent
can read it; the artifact store checks that body against the Struct registered here for the
artifact's ``type`` before it stores anything. A new artifact type is one Struct and one entry in
``ARTIFACT_TYPES``; a breaking change to a body bumps that type's ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal

import msgspec


class ArtifactBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every artifact body. Unknown fields are refused: a body is a contract, not a bag."""

    SCHEMA_VERSION: ClassVar[int] = 1


class Text(ArtifactBody, kw_only=True):
    """Plain text: a task input, a document, an excerpt."""

    text: str


class Prompt(ArtifactBody, kw_only=True):
    """A prompt given to the mesh as a task input."""

    text: str


class Answer(ArtifactBody, kw_only=True):
    """A model's answer to the task goal."""

    text: str
    model: str
    # Replay backends only: whether the recorded answer was graded correct; None when unknown.
    graded: bool | None = None


Verdict = Literal["accept", "revise"]


class Review(ArtifactBody, kw_only=True):
    """A check of an answer: ``accept`` it, or ``revise`` it, in which case ``text`` is the corrected answer."""

    text: str
    model: str
    verdict: Verdict
    graded: bool | None = None


ARTIFACT_TYPES: dict[str, type[ArtifactBody]] = {
    "text": Text,
    "prompt": Prompt,
    "answer": Answer,
    "review": Review,
}


class ArtifactError(ValueError):
    """An artifact the store refuses; the message is the reason given back to the sender."""


def validate_body(artifact_type: str, schema_version: int, body: dict[str, Any]) -> dict[str, Any]:
    """Check ``body`` against its type's schema and return it normalised (defaults filled in).

    Normalising first means two bodies that differ only by an omitted default get one id.
    """
    schema = ARTIFACT_TYPES.get(artifact_type)
    if schema is None:
        raise ArtifactError(f"unknown artifact type {artifact_type!r}; known: {', '.join(sorted(ARTIFACT_TYPES))}")
    if schema_version != schema.SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact type {artifact_type!r} has schema version {schema.SCHEMA_VERSION}, not {schema_version}"
        )
    try:
        return msgspec.to_builtins(msgspec.convert(body, type=schema))
    except msgspec.ValidationError as exc:
        raise ArtifactError(f"invalid {artifact_type!r} body: {exc}") from None


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal values always give equal bytes."""
    return msgspec.json.encode(value, order="sorted")


def artifact_id(artifact_type: str, schema_version: int, body: dict[str, Any]) -> str:
    """The content address: sha256 hex of the canonical JSON of type, schema version and body."""
    document = {"type": artifact_type, "schema_version": schema_version, "body": body}
    return hashlib.sha256(canonical_json(document)).hexdigest()
