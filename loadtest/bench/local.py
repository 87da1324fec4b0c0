"""What the mesh adds to a local generation, against the engine called directly, in one run.

``python -m loadtest.bench.local --json``. A private stack (embedded nats-server, ClickHouse, the
six services as processes, and the local engine: the embedded CPU engine with SmolLM2-135M, or
the OpenAI-compatible engine at ``--engine-url``, e.g. vLLM on a GPU host) serves the shipped
deploy. The same greedy 200-token generation runs alternately:

- direct: this process streams it from the engine over HTTP (the mesh's own client);
- mesh: an InferenceRequest over NATS to local-inference, which streams it from the engine,
  meters it and replies.

Per path: time to first token, whole-call time and decode rate. The mesh's time to first token
is an upper bound: the caller only sees the reply, so it is the whole call less the decoding
after the first token, which counts the reply's trip back as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats

from loadtest.stats import percentiles
from schemas.messages import ChatMessage, InferenceRequest, InferenceResult
from services.embedded.engine import SMOLLM2_NAME
from services.embedded.stack import Stack
from services.inference.openai_client import OpenAIClient
from services.runtime.bus import encode, now_ms
from services.runtime.catalog import Catalog
from services.runtime.grants import load_signer, reservation_for
from services.runtime.settings import MeshSettings

MODEL = SMOLLM2_NAME
TOKENS = 200
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


async def direct(client: OpenAIClient) -> dict:
    started = time.perf_counter()
    reply = await client.chat(MODEL, [{"role": "user", "content": PROMPT}], max_tokens=TOKENS)
    total_s = time.perf_counter() - started
    assert reply.usage is not None, "the engine reported no usage"
    return _figures(total_s, reply.ttft_s, reply.usage.completion_tokens)


async def through_mesh(nc: nats.NATS, settings: MeshSettings) -> dict:
    request = InferenceRequest(
        call_id=uuid.uuid4().hex,
        task_id="bench-local",
        step_id="generate",
        model=MODEL,
        tier="local",
        messages=[ChatMessage(role="user", content=PROMPT)],
        max_tokens=TOKENS,
        deadline_ms=now_ms() + 600_000,
    )
    # The local model is priced by its hardware profile, so the call is paid: sign the grant the
    # accountant would (this process stands in for router and accountant, with the stack's seed).
    model = Catalog.load(settings.deploy_dir).model(MODEL)
    request.grant = load_signer(settings.home).grant(reservation_for(request, model))
    started = time.perf_counter()
    reply = await nc.request(settings.subjects.infer_local(MODEL), encode(request), timeout=600)
    total_s = time.perf_counter() - started
    result = msgspec.json.decode(reply.data, type=InferenceResult)
    if result.error:
        raise RuntimeError(f"mesh call failed: {result.error.message}")
    decode_after_first_s = (result.latency_ms - result.ttft_ms) / 1000
    return _figures(total_s, total_s - decode_after_first_s, result.usage.output_tokens)


def _figures(total_s: float, ttft_s: float, tokens: int) -> dict:
    return {"total_ms": total_s * 1000, "ttft_ms": ttft_s * 1000, "tokens": tokens,
            "tokens_per_s": (tokens - 1) / (total_s - ttft_s) if total_s > ttft_s else 0.0}


async def run(settings: MeshSettings, rounds: int) -> dict:
    client = OpenAIClient(settings.local_engine_url)
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    await direct(client)  # warm: weights paged in, the prompt's prefix in the KV cache
    await through_mesh(nc, settings)
    samples: dict[str, list[dict]] = {"direct": [], "mesh": []}
    for i in range(rounds):
        log(f"round {i + 1}/{rounds}")
        # Alternating, so drift in the machine's load falls on both paths alike.
        samples["direct"].append(await direct(client))
        samples["mesh"].append(await through_mesh(nc, settings))
    await nc.drain()
    await client.aclose()

    def p50(path: str, key: str) -> float:
        median = percentiles([s[key] for s in samples[path]]).p50
        if median is None:
            raise ValueError(f"no {path} samples to take the median of (rounds={rounds})")
        return median

    direct_total, mesh_total = p50("direct", "total_ms"), p50("mesh", "total_ms")
    return {
        "model": MODEL,
        "engine_url": settings.local_engine_url,
        "rounds": rounds,
        "completion_tokens": samples["mesh"][-1]["tokens"],
        "direct_total_ms_p50": direct_total,
        "mesh_total_ms_p50": mesh_total,
        "direct_ttft_ms_p50": p50("direct", "ttft_ms"),
        "mesh_ttft_ms_p50": p50("mesh", "ttft_ms"),
        "direct_tokens_per_s_p50": p50("direct", "tokens_per_s"),
        "mesh_tokens_per_s_p50": p50("mesh", "tokens_per_s"),
        "mesh_added_ms_p50": mesh_total - direct_total,
        "mesh_added_pct": (mesh_total - direct_total) / direct_total * 100,
    }


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Local generation through the mesh vs the engine called directly.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object (the only output).")
    parser.add_argument("--rounds", type=int, default=10, help="Generations per path [10].")
    parser.add_argument("--engine-url", default="", help="A running OpenAI-compatible engine serving smollm2-135m "
                        "(base URL ending /v1); default: start the embedded CPU engine.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="frugalmesh-bench-") as tmp:
        home = Path(tmp) / "home"
        if args.engine_url:
            os.environ["FRUGALMESH_LOCAL_ENGINE_URL"] = args.engine_url
        settings = MeshSettings(home=home, subject_prefix="bench" + uuid.uuid4().hex[:6])
        with Stack(home=home, nats_port=-1, clickhouse_port=0, settings=settings) as stack:
            log(f"local engine at {stack.settings.local_engine_url}")
            # This process calls local-inference as the router would: on the router's credential.
            as_router = stack.settings.model_copy(update={"nats_creds": stack.creds.get("router")})
            result = asyncio.run(run(as_router, args.rounds))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
