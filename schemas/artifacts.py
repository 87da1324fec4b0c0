"""The body schema of each artifact type, and the content address of an artifact.

An ``Artifact`` (schemas/messages.py) carries its body as a plain JSON object so that any agent
can read it; the artifact store checks that body against the Struct registered here for the
artifact's ``type`` before it stores anything. A new artifact type is one Struct and one entry in
``ARTIFACT_TYPES``; a breaking change to a body bumps that type's ``SCHEMA_VERSION``.

A type a model writes itself as JSON (structured output) subclasses ``StructuredBody``: its own
fields are the model's, ``response_schema`` is the JSON Schema a call sends for them, and
``parse_structured`` validates a reply into a body (the store then validates it again, as it does
every body).

An artifact's id (``artifact_id``) is the content address of its tenant, type, schema version and
body: the same body stored by two tenants is two artifacts, each readable by its own tenant only.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, ClassVar, Literal

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
    """An answer to the task goal, by a model or an agent."""

    text: str
    model: Annotated[
        str,
        msgspec.Meta(
            description="The model that wrote it; empty when an agent composed it (its calls name the models)."
        ),
    ] = ""
    graded: Annotated[
        bool | None,
        msgspec.Meta(description="Replay backends only: whether the recorded answer was graded correct; else null."),
    ] = None


Verdict = Literal["accept", "revise"]


class Review(ArtifactBody, kw_only=True):
    """A check of an answer: ``accept`` it, or ``revise`` it, in which case ``text`` is the corrected answer."""

    text: str
    model: str
    verdict: Verdict
    graded: bool | None = None


class StructuredBody(ArtifactBody, kw_only=True):
    """Base of a body that a model writes itself, as one JSON object (structured output).

    The fields a subclass declares are the model's: their JSON Schema (``response_schema``) is
    sent with the call, and the model's reply must decode to them (``parse_structured``). The
    fields below are not the model's: the planner fills them in, so that two items that happen
    to get the same answer are still two artifacts, each with its own lineage.
    """

    # The planner's fields, left out of the response schema.
    PROVENANCE: ClassVar[tuple[str, ...]] = ("input", "model")

    input: Annotated[
        str, msgspec.Meta(description="The id of the task input this body is about; empty when about no single input.")
    ] = ""
    model: Annotated[
        str, msgspec.Meta(description="The model that wrote it, as the inference service reported it.")
    ] = ""


TicketCategory = Literal["billing", "bug", "account", "feature", "other"]


class TicketLabel(StructuredBody, kw_only=True):
    """One support ticket triaged (the ``triage`` workflow): its topic and whether it is urgent."""

    label: TicketCategory
    urgent: bool


_ARTIFACT_ID = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class Batch(ArtifactBody, kw_only=True):
    """What a step run once per task input (``for_each = "inputs"``) produced: one artifact of type
    ``of`` per input, in the task's input order (``items[i]`` answers ``inputs[i]``)."""

    of: str
    items: list[_ARTIFACT_ID]
    inputs: list[_ARTIFACT_ID]

    def __post_init__(self) -> None:
        if self.of not in ARTIFACT_TYPES or self.of == "batch":
            raise ValueError(f"a batch holds artifacts of one known type, not {self.of!r}")
        if len(self.items) != len(self.inputs):
            raise ValueError(
                f"a batch pairs each item with its input: {len(self.items)} items, {len(self.inputs)} inputs"
            )


ARTIFACT_TYPES: dict[str, type[ArtifactBody]] = {
    "text": Text,
    "prompt": Prompt,
    "answer": Answer,
    "review": Review,
    "ticket_label": TicketLabel,
    "batch": Batch,
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
        normalised: dict[str, Any] = msgspec.to_builtins(msgspec.convert(body, type=schema))
    except msgspec.ValidationError as exc:
        raise ArtifactError(f"invalid {artifact_type!r} body: {exc}") from None
    return normalised


def is_structured(artifact_type: str) -> bool:
    """Whether a model writes this type's body itself, as JSON (a StructuredBody)."""
    schema = ARTIFACT_TYPES.get(artifact_type)
    return schema is not None and issubclass(schema, StructuredBody)


def response_schema(artifact_type: str) -> dict[str, Any]:
    """The JSON Schema a model's reply must follow for ``artifact_type`` (a StructuredBody): the
    model's own fields only, as one self-contained object schema (no ``$ref``), which is what
    grammar-constrained decoding (llama.cpp) and OpenAI's ``response_format`` both take."""
    schema = ARTIFACT_TYPES[artifact_type]
    if not issubclass(schema, StructuredBody):
        raise ArtifactError(f"artifact type {artifact_type!r} is not written by a model as JSON")
    document = msgspec.json.schema(schema)
    definitions = document.get("$defs", {})
    resolved = dict(definitions[document["$ref"].rsplit("/", 1)[-1]]) if "$ref" in document else dict(document)
    properties = {k: v for k, v in resolved.get("properties", {}).items() if k not in schema.PROVENANCE}
    for value in properties.values():
        if "$ref" in value:
            raise ArtifactError(f"artifact type {artifact_type!r}: nested types are not supported in a response schema")
    resolved["properties"] = properties
    resolved["required"] = [k for k in resolved.get("required", []) if k in properties]
    resolved["additionalProperties"] = False
    return resolved


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_structured(artifact_type: str, output: str, **provenance: str) -> dict[str, Any]:
    """The body a model's ``output`` stands for: its JSON decoded and checked against the type's
    schema (msgspec: types, enums, unknown fields, and any ``__post_init__`` rule), with the
    planner's ``provenance`` fields set. Raises ArtifactError saying what is wrong.

    A reply wrapped in a Markdown code fence is unwrapped first (models without a grammar do that);
    nothing else is repaired: a truncated or malformed reply is invalid."""
    schema = ARTIFACT_TYPES[artifact_type]
    if not issubclass(schema, StructuredBody):
        raise ArtifactError(f"artifact type {artifact_type!r} is not written by a model as JSON")
    text = output.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        decoded = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:  # nesting past Python's stack raises the latter
        raise ArtifactError(f"not valid JSON ({exc}): {_clip(output)}") from None
    if not isinstance(decoded, dict):
        raise ArtifactError(f"expected a JSON object, got {type(decoded).__name__}: {_clip(output)}")
    # The planner's fields are the planner's: whatever the model wrote there is replaced.
    body = {**{k: v for k, v in decoded.items() if k not in schema.PROVENANCE}, **provenance}
    try:
        checked: dict[str, Any] = msgspec.to_builtins(msgspec.convert(body, type=schema))
    except msgspec.ValidationError as exc:
        raise ArtifactError(f"does not match the {artifact_type!r} schema ({exc}): {_clip(output)}") from None
    return checked


def _clip(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal values always give equal bytes."""
    return msgspec.json.encode(value, order="sorted")


def artifact_id(tenant: str, artifact_type: str, schema_version: int, body: dict[str, Any]) -> str:
    """The content address: sha256 hex of the canonical JSON of tenant, type, schema version and body.

    The tenant is hashed in so that two tenants storing the same body get two artifacts: with one
    id, whether a tenant could read "its own" artifact (and whose lineage and task it showed) would
    depend on which tenant stored that body first."""
    document = {"tenant": tenant, "type": artifact_type, "schema_version": schema_version, "body": body}
    return hashlib.sha256(canonical_json(document)).hexdigest()
