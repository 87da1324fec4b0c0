"""Write one JSON Schema per wire message into ``schemas/json/`` for non-Python agents."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from schemas.messages import WIRE_MESSAGES

JSON_DIR = Path(__file__).parent / "json"


def render() -> dict[str, str]:
    """File name -> schema text, for every wire message."""
    out = {}
    for message in WIRE_MESSAGES:
        schema = msgspec.json.schema(message)
        out[f"{message.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
