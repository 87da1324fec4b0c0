"""Where the recorded public data lives, and the recorded model outcomes read from it.

The data directory is, in order: an explicit ``--data`` path, ``FRUGALMESH_DATA``, or the
user cache that ``frugalmesh data fetch`` fills. Nothing here downloads anything.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

ROUTING_DIR = "routing"
GSM8K_FILE = "routing/gsm8k_responses.csv"
GSM8K_CONTAMINATED = "routing/gsm8k_contaminated_prompts.jsonl"
MMLU_DIR = "routing/mmlu"
MMLU_CONTAMINATED = "routing/mmlu/contaminated_prompts.jsonl"
RESPONSE_SUFFIX = "_response"

csv.field_size_limit(1 << 30)


class DataNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("frugalmesh")) / "data"


def resolve_data_dir(explicit: Path | str | None = None) -> Path:
    """The data directory to read from, or DataNotFound saying how to get one."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--data", Path(explicit)))
    elif os.environ.get("FRUGALMESH_DATA"):
        candidates.append(("FRUGALMESH_DATA", Path(os.environ["FRUGALMESH_DATA"])))
    else:
        candidates.append(("the cache", cache_dir()))
    source, path = candidates[0]
    if (path / GSM8K_FILE).is_file():
        return path.resolve()
    raise DataNotFound(
        f"no recorded data in {path} (from {source}). "
        "Run `frugalmesh data fetch` to download the public data sets into the cache, "
        "or point --data / FRUGALMESH_DATA at a directory that holds routing/ and traces/."
    )


@dataclass(frozen=True)
class Record:
    """One prompt with each model's recorded outcome (and answer text where recorded)."""

    prompt: str
    dataset: str  # "gsm8k" or "mmlu/<domain>"
    correct: dict[str, bool]
    responses: dict[str, str] = field(default_factory=dict)


def _contaminated(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    with path.open() as f:
        return {json.loads(line)["eval_prompt"] for line in f if line.strip()}


def read_outcome_csv(path: Path, dataset: str, drop: Set[str] = frozenset()) -> list[Record]:
    """Read one CSV of the routing format: ``prompt``, a bool column per model, optional
    ``<model>_response`` text columns."""
    records = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "prompt" not in columns:
            raise ValueError(f"{path}: no 'prompt' column (columns: {columns})")
        models = [c for c in columns if c != "prompt" and not c.endswith(RESPONSE_SUFFIX)]
        for row in reader:
            if row["prompt"] in drop:
                continue
            records.append(
                Record(
                    prompt=row["prompt"],
                    dataset=dataset,
                    correct={m: row[m].strip().lower() in ("true", "1") for m in models},
                    responses={
                        m: row[m + RESPONSE_SUFFIX] for m in models if row.get(m + RESPONSE_SUFFIX) is not None
                    },
                )
            )
    return records


def load_recorded_outcomes(data_dir: Path) -> list[Record]:
    """GSM8K and every MMLU domain present, contaminated prompts dropped."""
    records = read_outcome_csv(data_dir / GSM8K_FILE, "gsm8k", _contaminated(data_dir / GSM8K_CONTAMINATED))
    mmlu_drop = _contaminated(data_dir / MMLU_CONTAMINATED)
    for path in sorted((data_dir / MMLU_DIR).glob("mmlu_*.csv")):
        domain = path.stem.removeprefix("mmlu_")
        records.extend(read_outcome_csv(path, f"mmlu/{domain}", mmlu_drop))
    return records
