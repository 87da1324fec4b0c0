"""Write one JSON Schema per wire message into ``schemas/json/`` for non-Python agents."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from schemas.messages import WIRE_MESSAGES

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name -> schema text, for every wire message."""
    out = {}
    for message in WIRE_MESSAGES:
        schema = _clean_descriptions(msgspec.json.schema(message))
        out[f"{message.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def undocumented_fields() -> list[str]:
    """What the exported schemas leave unexplained, sorted: ``Type.field`` for a field without a
    ``Meta(description=...)`` and ``Type`` for a struct without a docstring, over every wire message
    and every struct nested in one. Empty when a non-Python author can read every field."""
    definitions: dict[str, Any] = {}
    for message in WIRE_MESSAGES:
        definitions.update(msgspec.json.schema(message).get("$defs", {}))
    missing = set()
    for name, definition in definitions.items():
        if not definition.get("description"):
            missing.add(name)
        for field, schema in definition.get("properties", {}).items():
            if not schema.get("description"):
                missing.add(f"{name}.{field}")
    return sorted(missing)


def _clean_descriptions(node: Any) -> Any:
    """Docstrings as ``inspect.cleandoc`` leaves them: msgspec 0.23 dedents them and earlier
    versions do not, and the checked-in schemas must not depend on which one is installed."""
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean_descriptions(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(v) for v in node]
    return node


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
