"""Recorded traffic as rows to replay: the Azure LLM CSVs, the Mooncake JSONL traces, and
frugalmesh's own recordings (``frugalmesh loadtest record``).

Every format becomes the same ``TraceRow``: when it arrived (seconds from the first row), how
many tokens went in and came out, and the ids of its prompt's 512-token prefix blocks (equal
ids, equal prefix). Traces carry sizes, never text; ``loadtest.prompts`` makes the text.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path

from services.runtime.data import resolve_data_dir

TRACES_DIR = "traces"
# Short names for the shipped traces (../shared/data/traces, or `frugalmesh data fetch`).
SHIPPED: dict[str, str] = {
    "azure-conv": "azure_llm_2023_conv.csv",
    "azure-code": "azure_llm_2023_code.csv",
    "mooncake-conversation": "mooncake_conversation_trace.jsonl",
    "mooncake-synthetic": "mooncake_synthetic_trace.jsonl",
}
RECORDING_VERSION = 1


@dataclass(frozen=True)
class TraceRow:
    arrival_s: float
    input_tokens: int
    # None: the recording did not know it; the workflow's own max_tokens applies.
    output_tokens: int | None
    # Ids of the prompt's 512-token blocks, namespaced by trace; empty: every block is the row's own.
    prefix_ids: tuple[str, ...] = ()
    # None: the replay's --tenant / --workflow.
    tenant: str | None = None
    workflow: str | None = None


def resolve_trace(name_or_path: str, data: Path | None = None) -> Path:
    """A shipped trace by short name (or file name) in the data directory, else a path."""
    file_name = SHIPPED.get(name_or_path, name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        return path
    if file_name in SHIPPED.values():
        return resolve_data_dir(data) / TRACES_DIR / file_name
    raise FileNotFoundError(
        f"no trace {name_or_path!r}: give a file, or one of {', '.join(SHIPPED)} (from the data directory)"
    )


def read_trace(path: Path, limit: int | None = None, duration_s: float | None = None) -> list[TraceRow]:
    """The rows of ``path``, arrival times from 0, cut at ``limit`` rows and ``duration_s`` seconds."""
    rows = islice(_rows(path), limit)
    if duration_s is not None:
        return [row for row in rows if row.arrival_s <= duration_s]
    return list(rows)


def _rows(path: Path) -> Iterator[TraceRow]:
    if path.suffix == ".csv":
        yield from _azure(path)
        return
    with path.open() as f:
        first = json.loads(f.readline())
    if "input_length" in first:
        yield from _mooncake(path)
    elif "input_tokens" in first:
        yield from _recording(path)
    else:
        raise ValueError(f"{path}: neither a Mooncake trace (input_length) nor a frugalmesh recording (input_tokens)")


def _azure(path: Path) -> Iterator[TraceRow]:
    """Azure LLM inference trace 2023: TIMESTAMP (100 ns resolution), ContextTokens, GeneratedTokens."""
    start: datetime | None = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            # Seven fractional digits: Python parses at most six.
            at = datetime.fromisoformat(row["TIMESTAMP"][:26])
            start = start or at
            yield TraceRow(
                arrival_s=(at - start).total_seconds(),
                input_tokens=int(row["ContextTokens"]),
                output_tokens=int(row["GeneratedTokens"]),
            )


def _mooncake(path: Path) -> Iterator[TraceRow]:
    """Mooncake (FAST'25): timestamp in ms, input_length, output_length, hash_ids of 512-token blocks."""
    namespace = path.stem
    start: int | None = None
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            start = row["timestamp"] if start is None else start
            yield TraceRow(
                arrival_s=(row["timestamp"] - start) / 1000,
                input_tokens=row["input_length"],
                output_tokens=row["output_length"],
                # A trace's ids mean nothing to another trace's: the same id in two traces is two blocks.
                prefix_ids=tuple(f"{namespace}:{h}" for h in row["hash_ids"]),
            )


def _recording(path: Path) -> Iterator[TraceRow]:
    """A frugalmesh recording; see ``loadtest.record`` for the fields."""
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("v", RECORDING_VERSION) > RECORDING_VERSION:
                raise ValueError(
                    f"{path}: recording version {row['v']} is newer than this reader ({RECORDING_VERSION})"
                )
            yield TraceRow(
                arrival_s=row["arrival_ms"] / 1000,
                input_tokens=row["input_tokens"],
                output_tokens=row.get("output_tokens"),
                prefix_ids=tuple(f"rec:{h}" for h in row.get("prefix_hashes", [])),
                tenant=row.get("tenant"),
                workflow=row.get("workflow"),
            )
