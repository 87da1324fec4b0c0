"""Decision latency of each routing policy on this CPU: `python -m loadtest.bench.router --json`.

One decision is ``policy.choose(step, catalog)``, what the router calls per step, including
feature extraction (prompt size in characters for the rules, the prompt's embedding for the learned policy) and,
for the cascade, the validator's check of the weak answer; for the online policy, each step tagged
with its recorded file's name, its replan every 100 calls included. Prompts are the recorded GSM8K and
MMLU prompts, cycled; the router file is the shipped one (deploy/routers/).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

from schemas.messages import ChatMessage, StepRequest
from services.router_training.dataset import load_outcomes
from services.routing.policies import CascadePolicy, LearnedPolicy
from services.routing.policies.fixed import FixedPolicy
from services.routing.policies.online import OnlinePolicy, OnlineSettings
from services.routing.policies.routerfile import RouterFile
from services.routing.table import RoutingTable
from services.runtime.bus import freeze_startup_objects
from services.runtime.catalog import Catalog
from services.runtime.data import ROUTING_DIR, resolve_data_dir
from services.runtime.settings import REPO_DEPLOY_DIR

DEFAULT_ROUTER = REPO_DEPLOY_DIR / "routers" / "mixtral-gpt4.npz"
WEAK_COLUMN = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def _time_us(decide: Callable[[int], object], n: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        decide(i)
    samples = np.empty(n)
    for i in range(n):
        started = time.perf_counter_ns()
        decide(i)
        samples[i] = (time.perf_counter_ns() - started) / 1000
    return {"p50_us": float(np.percentile(samples, 50)), "p99_us": float(np.percentile(samples, 99))}


def run(n: int, router_path: Path, data: Path | None) -> dict[str, dict[str, float]]:
    records = load_outcomes(resolve_data_dir(data) / ROUTING_DIR)
    catalog = Catalog.load(REPO_DEPLOY_DIR)
    table = RoutingTable.load(REPO_DEPLOY_DIR)
    router = RouterFile.load(router_path)
    steps = [
        StepRequest(
            task_id="bench",
            step_id="answer",
            workflow="answer",
            role="answer",
            messages=[ChatMessage(role="user", content=r.prompt)],
            deadline_ms=2**53,
        )
        for r in records
    ]
    answers = [r.responses[WEAK_COLUMN] for r in records if r.responses.get(WEAK_COLUMN)]
    learned, cascade = LearnedPolicy.from_file(router), CascadePolicy.from_file(router)
    online = OnlinePolicy.from_file(router, OnlineSettings())
    tagged = [
        msgspec.structs.replace(step, workflow=Path(r.dataset).name) for step, r in zip(steps, records, strict=True)
    ]
    fixed = FixedPolicy(router.strong_model)
    freeze_startup_objects()  # as the router service does once it has started
    warmup = min(200, n)
    return {
        "fixed": _time_us(lambda i: fixed.choose(steps[i % len(steps)], catalog), n, warmup),
        "rules": _time_us(lambda i: table.choose(steps[i % len(steps)], catalog), n, warmup),
        "learned": _time_us(lambda i: learned.choose(steps[i % len(steps)], catalog), n, warmup),
        "online": _time_us(lambda i: online.choose(tagged[i % len(tagged)], catalog), n, warmup),
        # The cascade's decision before its first call is fixed; its cost is the validator's check.
        "cascade_validator": _time_us(lambda i: cascade.validator.score(answers[i % len(answers)]), n, warmup),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="decisions timed per policy")
    parser.add_argument("--router", type=Path, default=DEFAULT_ROUTER)
    parser.add_argument("--data", type=Path, help="data directory (default: FRUGALMESH_DATA or the cache)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    results = run(args.n, args.router, args.data)
    if args.json:
        print(
            json.dumps(
                {
                    f"{policy}_{key}": round(value, 2)
                    for policy, figures in results.items()
                    for key, value in figures.items()
                }
            )
        )
        return
    for policy, figures in results.items():
        print(f"{policy:<18} p50 {figures['p50_us']:>9.1f} us   p99 {figures['p99_us']:>9.1f} us")


if __name__ == "__main__":
    main()
