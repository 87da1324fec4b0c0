"""frugalmesh against LiteLLM's proxy, in front of the same zero-latency upstream, in one run.

``python -m loadtest.bench.litellm --json``. LiteLLM is not a dependency of frugalmesh: install
its proxy anywhere (``pip install 'litellm[proxy]'``, ideally in its own virtual environment) and
put its ``litellm`` command on PATH or in ``LITELLM_BIN``; without it the benchmark says so and
exits 2.

- upstream: ``loadtest.upstream`` in its own process (loopback, answers at once);
- direct: the load generator straight to the upstream: the baseline subtracted from both gateways;
- LiteLLM: its proxy (one worker, no database: ``LITELLM_LOCAL_MODEL_COST_MAP=True``,
  ``LITELLM_TELEMETRY=False``) with the upstream as an ``openai/`` model and an in-memory
  per-model ``max_budget``, the one budget check it can run without Prisma; driven over HTTP;
- frugalmesh: a private stack (the six services as processes) whose only model is served by
  cloud-inference with the ``openai`` backend on the same upstream; driven with a StepRequest
  to the router, the mesh's entry point for one call (route, cache lookup, inference, metering);
  the planner and the artifact store, which LiteLLM has no counterpart for, are not in the path.
  Every reply's call must have its one usage row in ClickHouse (loss otherwise).

Each system gets the same open-loop schedule at 50, 100, 200, 500 and 1,000 calls/s; added
latency is the system's percentile minus the direct percentile at the same rate; a rate is
sustained with no error or time-out, no lost usage row, and every call answered within 10% of
the send time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import clickhouse_connect
import httpx
import msgspec
import nats

from loadtest.bench.common import bench_stack, open_loop
from loadtest.httpload import Post, drive
from loadtest.stats import percentiles
from schemas.messages import ChatMessage, InferenceResult, Reservation, StepRequest
from services.embedded.servers import free_port, stop_process
from services.runtime.bus import now_ms
from services.runtime.settings import MeshSettings

# calls/s, seconds at that rate: 100, 500 and 1,000, and 50 and 200 to place the highest rate sustained.
RATES = ((50, 5.0), (100, 5.0), (200, 5.0), (500, 4.0), (1000, 3.0))
CALL_TIMEOUT_S = 10.0
# A catalogue model, so the planner's pre-flight table (deploy/planner.toml) knows it.
MODEL = "gpt-4-1106-preview"
PROMPT = "Say 42."
MAX_TOKENS = 16
# LiteLLM refuses to start without a master key; with no database it is checked in memory.
MASTER_KEY = "sk-frugalmesh-bench"


class Missing(RuntimeError):
    pass


def litellm_command() -> str:
    found = os.environ.get("LITELLM_BIN") or shutil.which("litellm")
    if not found:
        raise Missing(
            "LiteLLM's proxy is not installed. It is not a frugalmesh dependency; install it for this "
            "benchmark only, e.g. python -m venv /tmp/litellm && /tmp/litellm/bin/pip install "
            "'litellm[proxy]', then LITELLM_BIN=/tmp/litellm/bin/litellm python -m loadtest.bench.litellm --json"
        )
    return found


def start_upstream() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.upstream", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    if process.stdout is None:  # stdout=PIPE gives one
        raise RuntimeError("the upstream's stdout is not a pipe")
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}/v1"


def start_litellm(command: str, upstream: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    config = tmp / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}
      api_key: not-needed
      max_budget: 1000000
      budget_duration: 30d
"""
    )
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
           "LITELLM_MASTER_KEY": MASTER_KEY}
    log = (tmp / "litellm.log").open("wb")
    process = subprocess.Popen(
        [command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"litellm exited with {process.returncode}; see {tmp / 'litellm.log'}")
        try:
            if httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200:
                return process, f"{url}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(process)
    raise RuntimeError("litellm did not come up within 120 s")


def summary(latencies: list[float | None], span_s: float, wall_s: float, rate: float) -> dict:
    ok = [v for v in latencies if v is not None]
    p = percentiles(ok)
    return {
        "calls": len(latencies),
        "error_share": 1 - len(ok) / len(latencies),
        "p50_ms": p.p50,
        "p99_ms": p.p99,
        "kept_up": wall_s <= span_s * 1.1 + 0.5,
    }


async def drive_http(base_url: str, rate: float, seconds: float) -> dict:
    # Not streamed: LiteLLM's proxy passes a non-streamed call on to an openai/ model non-streamed
    # (the openai SDK's chat.completions.create), so direct is the request LiteLLM makes upstream.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS})
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}  # the upstream ignores it
    post = Post.json(f"{base_url}/chat/completions", body.encode(), headers)
    run = await drive(post, rate, int(rate * seconds), CALL_TIMEOUT_S)
    return summary(run.latencies_ms, run.span_s, run.wall_s, rate)


async def drive_mesh(settings: MeshSettings, rate: float, seconds: float) -> dict:
    count = int(rate * seconds)
    latencies: list[float | None] = [None] * count
    call_ids: list[str] = []
    nc = await nats.connect(settings.nats_url)
    run = uuid.uuid4().hex[:8]

    async def call(i: int) -> None:
        step = StepRequest(
            task_id=f"bench{run}{i:06d}",
            step_id="answer",
            tenant="bench",
            workflow="answer",
            role="answer",
            # Unique per call, so the exact-match cache never answers in the upstream's place.
            messages=[ChatMessage(role="user", content=f"{PROMPT} ({run} {i})")],
            max_tokens=MAX_TOKENS,
            deadline_ms=now_ms() + int(CALL_TIMEOUT_S * 1000),
        )
        start = time.perf_counter()
        try:
            reply = await nc.request(settings.subjects.step_request, msgspec.json.encode(step), timeout=CALL_TIMEOUT_S)
            result = msgspec.json.decode(reply.data, type=InferenceResult)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError):
            return
        if result.call_id:
            call_ids.append(result.call_id)
        if result.error is None:
            latencies[i] = (time.perf_counter() - start) * 1000

    started = time.monotonic()
    span = await open_loop(rate, count, call)
    wall = time.monotonic() - started
    await nc.drain()
    result = summary(latencies, span, wall, rate)
    result["usage_rows_missing"] = missing_rows(settings.clickhouse_url, call_ids)
    return result


def missing_rows(clickhouse_url: str, call_ids: list[str], wait_s: float = 30.0) -> int:
    """Calls that replied but have no usage row once the accountant has caught up."""
    ch = clickhouse_connect.get_client(dsn=clickhouse_url)
    deadline = time.monotonic() + wait_s
    while True:
        stored = ch.query(
            "SELECT count() FROM usage_events FINAL WHERE event_id IN {ids:Array(String)}", parameters={"ids": call_ids}
        ).result_rows[0][0]
        if stored >= len(call_ids) or time.monotonic() > deadline:
            ch.close()
            return len(call_ids) - stored
        time.sleep(0.25)


async def budget_service_answers(settings: MeshSettings) -> bool:
    """Whether the accountant answers reservations in this build (they are being built alongside)."""
    nc = await nats.connect(settings.nats_url)
    probe = Reservation(
        id=uuid.uuid4().hex, tenant="bench", task_id="probe", model=MODEL, amount_usd=0.0, expires_ms=now_ms() + 1000
    )
    try:
        await nc.request(settings.subjects.budget_reserve, msgspec.json.encode(probe), timeout=2)
        return True
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    finally:
        await nc.drain()


def mesh_models(upstream: str) -> str:
    return f"""[models.{MODEL}]
tier = "frontier"
service = "cloud"
provider = "openai"
tokenizer = "cl100k"
input_usd_per_mtok = 10.0
output_usd_per_mtok = 30.0

[providers.openai]
backend = "openai"
base_url = "{upstream}"
"""


def added(system: dict, direct: dict) -> dict:
    """The system's percentiles minus the direct ones; null where the load generator could not
    keep up even without a gateway (the difference would then measure the generator, not the gateway)."""
    out = dict(system)
    out["baseline_saturated"] = not direct["kept_up"]
    for key in ("p50", "p99"):
        valid = direct["kept_up"] and system[f"{key}_ms"] is not None and direct[f"{key}_ms"] is not None
        out[f"added_{key}_ms"] = system[f"{key}_ms"] - direct[f"{key}_ms"] if valid else None
    return out


def sustained(by_rate: dict[str, dict]) -> int:
    best = 0
    for rate, figures in by_rate.items():
        if figures["error_share"] == 0 and figures["kept_up"] and not figures.get("usage_rows_missing"):
            best = max(best, int(rate.removesuffix("_per_s")))
    return best


def run(command: str) -> dict:
    upstream_process, upstream = start_upstream()
    result: dict = {"entry_point_frugalmesh": "StepRequest to the router (route, cache, inference, metering)"}
    try:
        direct = {f"{r}_per_s": asyncio.run(drive_http(upstream, r, s)) for r, s in RATES}
        result["direct_upstream"] = direct
        with bench_stack(mesh_models(upstream)) as settings:
            result["frugalmesh_budget_reservations_answering"] = asyncio.run(budget_service_answers(settings))
            mesh = {
                f"{r}_per_s": added(asyncio.run(drive_mesh(settings, r, s)), direct[f"{r}_per_s"]) for r, s in RATES
            }
        result["frugalmesh"] = mesh
        with tempfile.TemporaryDirectory(prefix="frugalmesh-bench-litellm-") as tmp:
            proxy, url = start_litellm(command, upstream, Path(tmp))
            try:
                lite = {f"{r}_per_s": added(asyncio.run(drive_http(url, r, s)), direct[f"{r}_per_s"]) for r, s in RATES}
            finally:
                stop_process(proxy)
        result["litellm"] = lite
        result["litellm_budget_check"] = "per-model max_budget in memory (key budgets and spend logs need a database)"
        result["frugalmesh_highest_sustained_calls_per_s"] = sustained(mesh)
        result["litellm_highest_sustained_calls_per_s"] = sustained(lite)
    finally:
        stop_process(upstream_process)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="frugalmesh vs LiteLLM's proxy on the same loopback upstream.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    args = parser.parse_args()
    try:
        command = litellm_command()
    except Missing as exc:
        print(json.dumps({"error": str(exc)}) if args.json else str(exc))
        sys.exit(2)
    result = run(command)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
