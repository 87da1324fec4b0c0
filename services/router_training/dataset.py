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


def split_outcomes(
    data_dir: Path, out: Path, by: SplitBy, test_share: float, seed: int, tune_share: float = 0.0
) -> dict[str, int]:
    """Write ``out/train`` and ``out/test`` (and ``out/tune`` with a ``tune_share``), same format,
    contaminated prompts already dropped.

    ``rows``: each file's prompts are shuffled and split. ``files``: whole files are held out
    (a domain split: the test domains are never seen in training), except that a file alone in
    its folder is split by rows. ``tune`` is a second held-out side for design choices, so that
    ``test`` can stay a final hold-out nobody tuned against. Returns the prompt count of each side.
    """
    if not data_dir.is_dir():
        raise NotADirectoryError(f"split reads a directory of CSVs, not {data_dir}")
    if not 0 < test_share < 1 or not 0 <= tune_share < 1 or test_share + tune_share >= 1:
        raise ValueError(f"test_share and tune_share must leave a training share: not {test_share} and {tune_share}")
    rng = random.Random(seed)
    drop = contaminated_prompts(data_dir)
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in outcome_files(data_dir):
        by_folder[path.parent].append(path)
    counts = {"train": 0, "test": 0} | ({"tune": 0} if tune_share else {})
    for files in by_folder.values():
        side_of: dict[Path, str] = {}
        whole_files = by == "files" and len(files) > 1
        if whole_files:
            shuffled = files[:]
            rng.shuffle(shuffled)
            n_test = max(1, round(test_share * len(files)))
            n_tune = round(tune_share * len(files))
            side_of = {path: "test" for path in shuffled[:n_test]}
            side_of |= {path: "tune" for path in shuffled[n_test : n_test + n_tune]}
        for path in files:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = [row for row in reader if row["prompt"] not in drop]
            if whole_files:
                sides = {side_of.get(path, "train"): rows}
            else:
                rng.shuffle(rows)
                test_cut, tune_cut = round(test_share * len(rows)), round((test_share + tune_share) * len(rows))
                sides = {"test": rows[:test_cut], "train": rows[tune_cut:]}
                if tune_share:
                    sides["tune"] = rows[test_cut:tune_cut]
            for side, side_rows in sides.items():
                target = out / side / path.relative_to(data_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("w", newline="") as f:
                    writer = csv.DictWriter(f, columns)
                    writer.writeheader()
                    writer.writerows(side_rows)
                counts[side] += len(side_rows)
    return counts
