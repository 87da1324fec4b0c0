"""What the experiments draw on: recorded prompts, the models that answer them, and honest error bars.

- The pool: GSM8K, MMLU or both (``all``, the default: the whole recording, so a model's accuracy
  over the pool is exactly the ``p`` the pre-flight estimate takes for it), contaminated prompts
  dropped (services/runtime/data.py).
- Prompts are drawn without replacement, so within an arm no prompt is asked twice by accident
  (the router's cache would answer the second time).
- A measured share comes with its Wilson 95% interval: it behaves at 0 and 1, where chains of 40
  steps live.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from services.runtime.data import Record, load_recorded_outcomes

if TYPE_CHECKING:  # the CLI imports this module for DATASETS: keep its start-up light
    from services.runtime.catalog import Catalog, ModelSpec

Dataset = Literal["all", "gsm8k", "mmlu"]
DATASETS: tuple[Dataset, ...] = ("all", "gsm8k", "mmlu")
# The 95% quantile of the standard normal, for the Wilson interval.
Z95 = 1.959964


def recorded_pool(data_dir: Path, dataset: Dataset) -> list[Record]:
    """The recorded prompts of ``dataset``, in the recording's order."""
    records = load_recorded_outcomes(data_dir)
    if dataset == "gsm8k":
        return [r for r in records if r.dataset == "gsm8k"]
    if dataset == "mmlu":
        return [r for r in records if r.dataset.startswith("mmlu/")]
    return records


def draw(pool: Sequence[Record], n: int, rng: random.Random) -> list[Record]:
    """``n`` distinct prompts; ValueError saying how to fit when the pool is smaller."""
    if n > len(pool):
        raise ValueError(f"the run needs {n:,} distinct prompts and the pool has {len(pool):,}: ask for fewer")
    return rng.sample(list(pool), n)


def accuracy(pool: Sequence[Record], model: ModelSpec) -> float:
    """Share of ``pool`` that ``model``'s recorded answers got right."""
    column = model.recorded_as or ""
    return sum(r.correct[column] for r in pool) / len(pool) if pool else math.nan


def recorded_model(catalog: Catalog, name: str) -> ModelSpec:
    """The catalogue's model ``name``, which must have recorded outcomes; ValueError saying which do."""
    recorded = sorted(m.name for m in catalog.models.values() if m.recorded_as)
    model = catalog.models.get(name)
    if model is None or not model.recorded_as:
        raise ValueError(f"model {name!r} has no recorded outcomes; use one of: {', '.join(recorded)}")
    return model


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of ``successes`` out of ``n`` (0..1 for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    share = successes / n
    centre = (share + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(share * (1 - share) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
