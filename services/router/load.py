"""Load-aware spillover: when a local model's queue would make a step miss its deadline, the call
goes one tier up the ladder instead (inside the step's allow-list), metered with ``spilled_from``.

The router keeps the latest ``LocalLoad`` each local-inference replica publishes per model
(services/local_inference/load.py); a report older than ``stale_s`` (2 s) by the router's own
clock is ignored. For a call of ``max_tokens`` on a local model, the estimate is

    per_call_s = ttft + max_tokens / decode rate
    finish_s   = per_call_s * (1 + ahead / slots)

- decode rate: the engine's recent rate for one sequence (llama.cpp's ``predicted_tokens_seconds``,
  vLLM's inter-token latency), else the catalogue's ``output_tokens_per_s``, else 50 tokens/s.
- ``ahead``: requests that must finish before this one can start, each assumed to be a call like
  this one (the engine does not say how long the others are). llama.cpp (and the embedded engine)
  generates one request at a time: everything running or waiting is ahead, over 1 slot; the
  replicas' own in-flight counts and this router's own unanswered calls, which an engine's last
  read may not show yet, are lower bounds of that queue. vLLM batches: a new request joins the
  running batch at once unless requests are waiting or the KV cache is full, and then it waits for
  the waiting ones and itself to get a slot, over ``running`` slots.
- Engines read through several replicas count once (same ``endpoint``); distinct engines pool
  their queues and slots, as a queue group spreads calls over them.

The call spills when something is ahead and ``finish_s`` passes the step's deadline. An idle engine
never spills (the load is not the problem there), nor does a model with no engine metrics (a
replay model: its queue discipline is unknown), nor a model with no fresh report.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.messages import LocalLoad
from services.routing.table import pick_model
from services.runtime.catalog import TIER_LADDER, Catalog, ModelSpec

DEFAULT_STALE_S = 2.0
# A decode rate for an engine that has not measured one and a model whose catalogue entry has none.
DEFAULT_DECODE_TOKENS_PER_S = 50.0
# vLLM admits new requests while KV-cache blocks are free; past this share it queues them.
KV_CACHE_FULL = 0.98


@dataclass(frozen=True)
class FinishEstimate:
    """When a call on a local model would finish, from the load the router knows of."""

    model: str
    # Requests ahead of this call, and the slots that work through them.
    ahead: float
    slots: float
    decode_tokens_per_s: float
    per_call_s: float
    finish_s: float

    def breaks(self, remaining_s: float) -> bool:
        return self.ahead > 0 and self.finish_s > remaining_s


class LoadBoard:
    """The latest load of each local model, per replica, and this router's own calls on them."""

    def __init__(
        self, stale_s: float = DEFAULT_STALE_S, default_tokens_per_s: float = DEFAULT_DECODE_TOKENS_PER_S
    ) -> None:
        self.stale_s = stale_s
        self.default_tokens_per_s = default_tokens_per_s
        self._reports: dict[str, dict[str, tuple[LocalLoad, float]]] = {}
        # Calls this router has sent to each local model and not had answered.
        self.pending: Counter[str] = Counter()

    def update(self, load: LocalLoad, received: float | None = None) -> None:
        """Keep ``load``; staleness is by the time it arrived here, so clock skew between
        machines does not matter."""
        at = time.monotonic() if received is None else received
        self._reports.setdefault(load.model, {})[load.replica] = (load, at)

    def fresh(self, model: str, now: float | None = None) -> list[LocalLoad]:
        now = time.monotonic() if now is None else now
        reports = self._reports.get(model, {})
        for replica, (_, at) in list(reports.items()):
            if now - at > self.stale_s:
                del reports[replica]  # a replica that stopped reporting is forgotten
        return [load for load, _ in reports.values()]

    def estimate(self, model: ModelSpec, max_tokens: int, now: float | None = None) -> FinishEstimate | None:
        """None when no fresh report carries engine metrics: nothing is known to queue on."""
        fresh = self.fresh(model.name, now)
        # One engine per endpoint, however many replicas read it; its latest read.
        engines = {load.endpoint: load for load in sorted(fresh, key=lambda report: report.time_ms) if load.engine}
        if not engines:
            return None
        rates = [e.decode_tokens_per_s for e in engines.values() if e.decode_tokens_per_s]
        rate = sum(rates) / len(rates) if rates else model.output_tokens_per_s or self.default_tokens_per_s
        per_call_s = model.ttft_ms / 1000 + max_tokens / rate
        ahead = slots = 0.0
        serial = True
        for engine in engines.values():
            if engine.engine == "vllm":
                serial = False
                full = engine.waiting > 0 or engine.kv_cache_usage >= KV_CACHE_FULL
                ahead += engine.waiting + 1 if full else 0
                slots += max(engine.running, 1)
            else:
                ahead += engine.running + engine.waiting
                slots += 1
        if serial:
            # Every call on a one-at-a-time engine is running or waiting there, or on its way.
            ahead = max(ahead, sum(load.in_flight for load in fresh), self.pending[model.name])
        return FinishEstimate(
            model=model.name,
            ahead=ahead,
            slots=slots,
            decode_tokens_per_s=rate,
            per_call_s=per_call_s,
            finish_s=per_call_s * (1 + ahead / slots),
        )


def spill_target(model: ModelSpec, allow_models: Sequence[str] | None, catalog: Catalog) -> ModelSpec | None:
    """The model a call on ``model`` spills to: the table's pick for the next tier up (its cheapest
    allowed model, else the nearest allowed tier above that), never one outside the allow-list and
    never one of the same tier or below. None when the allow-list has nothing above."""
    rank = TIER_LADDER.index(model.tier)
    if rank + 1 >= len(TIER_LADDER):
        return None
    allowed = None if allow_models is None else [m for m in allow_models if m in catalog.models]
    above = [m for m in catalog.models.values() if TIER_LADDER.index(m.tier) > rank]
    if allowed is not None and not any(m.name in allowed for m in above):
        return None
    target = pick_model(TIER_LADDER[rank + 1], allowed, catalog)
    return target if TIER_LADDER.index(target.tier) > rank else None
