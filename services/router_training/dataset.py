"""Recorded outcomes from a directory of CSVs: the format users bring their own data in.

Every ``*.csv`` under the directory (recursively) has a ``prompt`` column, one boolean column per
model (was its answer correct) and optional ``<model>_response`` text columns. Prompts listed in
any ``*contaminated*.jsonl`` under the directory (``eval_prompt`` or ``prompt`` per line) are
dropped, as the RouteLLM paper drops prompts that overlap its routers' training data.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Literal

from services.runtime.data import Record, read_outcome_csv

SplitBy = Literal["rows", "files"]


def contaminated_prompts(data: Path) -> set[str]:
    """The prompts to drop: listed under a directory, or beside a single CSV."""
    lists = data.rglob("*contaminated*.jsonl") if data.is_dir() else data.parent.glob("*contaminated*.jsonl")
    drop: set[str] = set()
    for path in sorted(lists):
        with path.open() as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    drop.add(entry.get("eval_prompt") or entry["prompt"])
    return drop


def outcome_files(data: Path) -> list[Path]:
    files = sorted(data.rglob("*.csv")) if data.is_dir() else [data]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no *.csv at {data}")
    return files


def load_outcomes(data: Path) -> list[Record]:
    """Every record of a CSV, or of every CSV under a directory, contaminated prompts dropped;
    ``dataset`` is the file's path under the directory (or its name) without ``.csv``."""
    drop = contaminated_prompts(data)
    root = data if data.is_dir() else data.parent
    records: list[Record] = []
    for path in outcome_files(data):
        records.extend(read_outcome_csv(path, str(path.relative_to(root).with_suffix("")), drop))
    return records


def split_outcomes(data_dir: Path, out: Path, by: SplitBy, test_share: float, seed: int) -> dict[str, int]:
    """Write ``out/train`` and ``out/test``, same format, contaminated prompts already dropped.

    ``rows``: each file's prompts are shuffled and split. ``files``: whole files are held out
    (a domain split: the test domains are never seen in training), except that a file alone in
    its folder is split by rows. Returns the prompt count of each side.
    """
    if not data_dir.is_dir():
        raise NotADirectoryError(f"split reads a directory of CSVs, not {data_dir}")
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be between 0 and 1, not {test_share}")
    rng = random.Random(seed)
    drop = contaminated_prompts(data_dir)
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in outcome_files(data_dir):
        by_folder[path.parent].append(path)
    counts = {"train": 0, "test": 0}
    for files in by_folder.values():
        held_out: set[Path] = set()
        if by == "files" and len(files) > 1:
            shuffled = files[:]
            rng.shuffle(shuffled)
            held_out = set(shuffled[: max(1, round(test_share * len(files)))])
        for path in files:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = [row for row in reader if row["prompt"] not in drop]
            if by == "files" and len(files) > 1:
                sides = {"test": rows} if path in held_out else {"train": rows}
            else:
                rng.shuffle(rows)
                cut = round(test_share * len(rows))
                sides = {"test": rows[:cut], "train": rows[cut:]}
            for side, side_rows in sides.items():
                target = out / side / path.relative_to(data_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("w", newline="") as f:
                    writer = csv.DictWriter(f, columns)
                    writer.writeheader()
                    writer.writerows(side_rows)
                counts[side] += len(side_rows)
    return counts
