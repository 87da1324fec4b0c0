"""The online policy retrained from the labels the mesh collected (`frugalmesh router train
--from-clickhouse`).

A label of the online policy is a pair: one step answered by both models (a shadow call and the
call it shadowed, or two calls a user judged), each judged. They are read from the view
``call_feedback`` (every verdict beside the call it judges): verdicts are averaged per step and
model, a score of at least 0.5 counts as right, and a step with a verdict on each model is a
pair, under the tag of its verdicts (else its task's workflow). Verdicts on one model alone are
kept in ClickHouse and not used: a tag's gap needs both answers.

The new router file is the base file (trained offline with `frugalmesh router train --data`)
with every pair added to its tag's outcomes; it is rebuilt from the base and all labels each
time, so no label is counted twice. Before that, its held-out figures: a plan made from the
older 80% of the pairs, judged on the newest 20% (the share routed weak, its accuracy as a share
of the strong model's): how the recalibrated plan does on the labels it has not seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from clickhouse_connect.driver.client import Client

from services.accountant.ddl import CALL_FEEDBACK, quote_identifier
from services.routing.policies.online import OnlinePolicy, OnlineSettings
from services.routing.policies.routerfile import RouterFile
from services.routing.policies.tags import count_outcomes

HELD_OUT_SHARE = 0.2
# Fewer newest pairs than this say nothing worth recording about the plan.
MIN_HELD_OUT = 20


@dataclass(frozen=True)
class LabelledPair:
    tag: str
    weak_correct: bool
    strong_correct: bool
    time: datetime


def read_pairs(ch: Client, database: str, weak: str, strong: str, tenant: str | None = None) -> list[LabelledPair]:
    """Every judged pair of ``weak`` and ``strong`` answers (of ``tenant``, or all), oldest first."""
    rows = ch.query(
        f"""
        SELECT task_id, step_id, model, any(tag) AS tag, avg(score) AS score, max(time) AS time
        FROM {quote_identifier(database)}.{CALL_FEEDBACK}
        WHERE model IN {{models:Array(String)}} AND ({{tenant:String}} = '' OR tenant = {{tenant:String}})
        GROUP BY task_id, step_id, model
        """,
        parameters={"models": [weak, strong], "tenant": tenant or ""},
    ).result_rows
    by_step: dict[tuple[str, str], dict[str, tuple[str, float, datetime]]] = {}
    for task_id, step_id, model, tag, score, time in rows:
        by_step.setdefault((task_id, step_id), {})[model] = (tag, score, time)
    pairs = [
        LabelledPair(
            tag=judged[weak][0] or judged[strong][0],
            weak_correct=judged[weak][1] >= 0.5,
            strong_correct=judged[strong][1] >= 0.5,
            time=max(judged[weak][2], judged[strong][2]),
        )
        for judged in by_step.values()
        if weak in judged and strong in judged
    ]
    return sorted(pairs, key=lambda p: p.time)


def _with_pairs(base: RouterFile, pairs: list[LabelledPair]) -> dict[str, list[int]]:
    outcomes = {tag: list(counts) for tag, counts in base.tag_outcomes.items()}
    by_tag: dict[str, list[tuple[bool, bool]]] = {}
    for pair in pairs:
        by_tag.setdefault(pair.tag, []).append((pair.weak_correct, pair.strong_correct))
    for tag, tag_pairs in by_tag.items():
        added = count_outcomes(tag_pairs)
        outcomes[tag] = [int(a + b) for a, b in zip(outcomes.get(tag, [0, 0, 0, 0]), added, strict=True)]
    return outcomes


def held_out_figures(base: RouterFile, pairs: list[LabelledPair], settings: OnlineSettings) -> dict:
    """The plan made from the older pairs, judged on the newest ``HELD_OUT_SHARE`` of them."""
    cut = len(pairs) - round(HELD_OUT_SHARE * len(pairs))
    older, newest = pairs[:cut], pairs[cut:]
    if len(newest) < MIN_HELD_OUT:
        return {"pairs": len(newest), "note": f"fewer than {MIN_HELD_OUT} newest pairs: not judged"}
    earlier = RouterFile(
        base.weak_model, base.strong_model, None, None, base.trained_on, tag_outcomes=_with_pairs(base, older)
    )
    policy = OnlinePolicy.from_file(earlier, settings)
    policy.traffic.update(Counter(p.tag for p in newest))
    policy.retrain()
    share = np.array([policy.weak_share(p.tag) for p in newest])
    weak = np.array([p.weak_correct for p in newest])
    strong = np.array([p.strong_correct for p in newest])
    accuracy = float(np.mean(share * weak + (1 - share) * strong))
    strong_accuracy = float(strong.mean())
    return {
        "pairs": len(newest),
        "weak_share": float(share.mean()),
        "accuracy": accuracy,
        "strong_accuracy": strong_accuracy,
        "meets_target": accuracy >= settings.target * strong_accuracy,
    }


def train_from_feedback(
    base: RouterFile,
    base_path: Path,
    pairs: list[LabelledPair],
    settings: OnlineSettings,
    tenant: str | None = None,
) -> RouterFile:
    """The base router file with the pairs added to its tags' outcomes, and where it came from."""
    held_out = held_out_figures(base, pairs, settings)
    provenance = {
        "base": str(base_path),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tenant": tenant or "",
        "target": settings.target,
        "labels": {
            "pairs": len(pairs),
            "first": pairs[0].time.isoformat() if pairs else None,
            "last": pairs[-1].time.isoformat() if pairs else None,
            "by_tag": dict(sorted(Counter(p.tag for p in pairs).items())),
        },
        "held_out": held_out,
    }
    return RouterFile(
        base.weak_model,
        base.strong_model,
        base.prompt_model,
        base.answer_model,
        base.trained_on,
        tag_outcomes=_with_pairs(base, pairs),
        provenance=provenance,
    )
