"""Load-aware spillover: local-inference publishes its engines' load, and the router sends a local
step one tier up when the local queue would break the step's deadline, metered as spilled.

The metrics reader is tested on realistic /metrics texts of llama.cpp's server and vLLM; the
estimate and the choice of the spill model as pure functions; the whole path on the real embedded
engine (SmolLM2-135M), saturated by long generations sent to it straight over HTTP, with the
mid tier on the replay backend and the usage rows in a real ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

import httpx
import msgspec
import pytest
from fakes.budget_peer import BudgetPeer
from fakes.inference_peer import InferencePeer
from helpers import eventually, kill_switch, make_step, pace_signal
from mesh_client import ask, engine_metrics, usage_row, wait_engine_idle

from schemas.messages import ChatMessage, InferenceRequest, InferenceResult, LocalLoad, StepRequest, UsageEvent
from services.inference.engine_load import (
    MetricsError,
    metrics_url,
    parse_metrics,
    with_decode_rate,
)
from services.router.load import DEFAULT_DECODE_TOKENS_PER_S, LoadBoard, spill_target
from services.runtime.bus import encode, now_ms
from services.runtime.control import set_kill, set_pace
from services.runtime.data import load_recorded_outcomes

LOCAL = "smollm2-135m"
REPLAY_LOCAL = "mixtral-8x7b-local"
MID = "mixtral-8x7b"
FRONTIER = "gpt-4-1106-preview"

# llama.cpp's server (`llama-server --metrics`) as it answers mid-generation with two requests queued.
LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 2.903
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 3469
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 35.44
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 3512
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode counter
llamacpp:n_busy_slots_per_decode 1
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 2371.51
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 97.88
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.0771484
# HELP llamacpp:kv_cache_tokens KV-cache tokens.
# TYPE llamacpp:kv_cache_tokens gauge
llamacpp:kv_cache_tokens 316
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""


def vllm_metrics(*, running: int, waiting: int, kv: float, latency_sum: float, latency_count: int) -> str:
    """vLLM v1's /metrics (abridged: every family the reader uses, and neighbours it must skip),
    serving two models so the reader has to keep to its own."""
    other = 'model_name="other-model",engine="0"'
    mine = 'model_name="smollm2-135m",engine="0"'
    return f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{mine}}} {running}.0
vllm:num_requests_running{{{other}}} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{mine}}} {waiting}.0
vllm:num_requests_waiting{{{other}}} 9.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{{mine}}} {kv}
vllm:kv_cache_usage_perc{{{other}}} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{{mine}}} 12800.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{{mine}}} {latency_count + running}.0
# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_sum{{{mine}}} {latency_sum}
vllm:inter_token_latency_seconds_bucket{{le="0.01",{mine}}} {latency_count // 2}.0
vllm:inter_token_latency_seconds_bucket{{le="0.025",{mine}}} {latency_count}.0
vllm:inter_token_latency_seconds_bucket{{le="+Inf",{mine}}} {latency_count}.0
vllm:inter_token_latency_seconds_count{{{mine}}} {latency_count}.0
vllm:inter_token_latency_seconds_sum{{{other}}} 99.0
vllm:inter_token_latency_seconds_count{{{other}}} 10.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{finished_reason="stop",{mine}}} 40.0
vllm:request_success_total{{finished_reason="length",{mine}}} 3.0
"""


# vLLM before v1 (0.5-0.8): the KV cache as gpu_cache_usage_perc, time_per_output_token_seconds.
VLLM_V0_METRICS = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",gpu_memory_utilization="0.9",num_gpu_blocks="2048"} 1.0
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 12.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 3.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 0.93
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.05",model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 1800.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 2000.0
vllm:time_per_output_token_seconds_count{model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 2000.0
vllm:time_per_output_token_seconds_sum{model_name="mistralai/Mixtral-8x7B-Instruct-v0.1"} 50.0
"""


# -- reading an engine's /metrics --


@pytest.mark.unit
def test_llamacpp_metrics_give_the_queue_kv_cache_and_decode_rate():
    load = parse_metrics(LLAMACPP_METRICS, LOCAL)
    assert (load.engine, load.running, load.waiting) == ("llamacpp", 1, 2)
    assert load.kv_cache_usage == pytest.approx(0.0771484)
    assert load.decode_tokens_per_s == pytest.approx(97.88)


@pytest.mark.unit
def test_a_llamacpp_engine_that_has_not_generated_yet_has_no_decode_rate():
    idle = LLAMACPP_METRICS.replace("llamacpp:predicted_tokens_seconds 97.88", "llamacpp:predicted_tokens_seconds 0")
    assert parse_metrics(idle).decode_tokens_per_s is None


@pytest.mark.unit
def test_vllm_metrics_keep_to_the_models_own_samples_and_rate_comes_from_two_reads():
    first = parse_metrics(vllm_metrics(running=4, waiting=2, kv=0.61, latency_sum=10.0, latency_count=1000), LOCAL)
    assert (first.engine, first.running, first.waiting) == ("vllm", 4, 2)
    assert first.kv_cache_usage == pytest.approx(0.61)
    # One read has no rate; the second: 400 tokens in 8 s of inter-token latency, 50 tokens/s.
    assert with_decode_rate(first, None).decode_tokens_per_s is None
    second = parse_metrics(vllm_metrics(running=4, waiting=0, kv=0.4, latency_sum=18.0, latency_count=1400), LOCAL)
    rated = with_decode_rate(second, first)
    assert rated.decode_tokens_per_s == pytest.approx(50.0)
    # No tokens since (idle): the last rate stands.
    idle = parse_metrics(vllm_metrics(running=0, waiting=0, kv=0.0, latency_sum=18.0, latency_count=1400), LOCAL)
    assert with_decode_rate(idle, rated).decode_tokens_per_s == pytest.approx(50.0)


@pytest.mark.unit
def test_vllm_metrics_without_the_models_label_sum_every_model():
    load = parse_metrics(vllm_metrics(running=4, waiting=2, kv=0.6, latency_sum=1.0, latency_count=10), "elsewhere")
    assert (load.running, load.waiting) == (11, 11)
    assert load.kv_cache_usage == pytest.approx(0.55)  # a ratio is averaged, not summed


@pytest.mark.unit
def test_older_vllm_names_are_read_too():
    load = parse_metrics(VLLM_V0_METRICS, "mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert (load.engine, load.running, load.waiting, load.kv_cache_usage) == ("vllm", 12, 3, 0.93)
    assert (load.token_latency_sum_s, load.token_latency_count) == (50.0, 2000.0)


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "<html>404 Not Found</html>", "# TYPE up gauge\nup 1\n", "llamacpp:x {"])
def test_text_that_is_not_an_engines_metrics_is_an_error(text):
    with pytest.raises(MetricsError):
        parse_metrics(text)


@pytest.mark.unit
def test_metrics_url_from_the_base_url():
    assert metrics_url("http://127.0.0.1:8090/v1") == "http://127.0.0.1:8090/metrics"
    assert metrics_url("http://gpu-1:8000/v1/") == "http://gpu-1:8000/metrics"


# -- the estimate and the spill model --


def report(*, engine: str = "llamacpp", running: int = 0, waiting: int = 0, replica: str = "r1", **fields) -> LocalLoad:
    fields.setdefault("endpoint", f"http://{replica}/metrics")
    return LocalLoad(
        model=LOCAL, replica=replica, engine=engine, running=running, waiting=waiting, time_ms=now_ms(), **fields
    )


@pytest.mark.unit
def test_a_one_at_a_time_engine_queues_everything_running_and_waiting(catalog):
    board = LoadBoard()
    board.update(report(running=1, waiting=3, decode_tokens_per_s=100.0))
    estimate = board.estimate(catalog.model(LOCAL), max_tokens=200)
    # Four calls ahead of this one, each assumed as long as this one: 5 x 2 s.
    assert (estimate.ahead, estimate.slots, estimate.per_call_s) == (4, 1, 2.0)
    assert estimate.finish_s == pytest.approx(10.0)
    assert estimate.breaks(remaining_s=9.0) and not estimate.breaks(remaining_s=11.0)


@pytest.mark.unit
def test_an_idle_engine_never_spills(catalog):
    board = LoadBoard()
    board.update(report(decode_tokens_per_s=10.0))
    estimate = board.estimate(catalog.model(LOCAL), max_tokens=500)
    assert estimate.ahead == 0 and estimate.finish_s == pytest.approx(50.0)
    assert not estimate.breaks(remaining_s=1.0)


@pytest.mark.unit
def test_calls_in_flight_and_the_routers_own_calls_are_lower_bounds_of_the_queue(catalog):
    board = LoadBoard()
    board.update(report(running=1, in_flight=3, replica="a", endpoint="http://engine/metrics"))
    board.update(report(running=1, in_flight=2, replica="b", endpoint="http://engine/metrics"))
    model = catalog.model(LOCAL)
    # One engine read by two replicas counts once; their calls in flight add up.
    assert board.estimate(model, 10).ahead == 5
    board.pending[LOCAL] = 7
    assert board.estimate(model, 10).ahead == 7
    # Without a rate from the engine or the catalogue, the default.
    assert board.estimate(model, 10).decode_tokens_per_s == DEFAULT_DECODE_TOKENS_PER_S


@pytest.mark.unit
def test_vllm_spills_only_when_its_batch_is_full(catalog):
    model = catalog.model(LOCAL)
    board = LoadBoard()
    board.update(report(engine="vllm", running=30, waiting=0, kv_cache_usage=0.5, decode_tokens_per_s=40.0))
    assert board.estimate(model, 400).ahead == 0  # joins the batch at once
    board.update(report(engine="vllm", running=30, waiting=0, kv_cache_usage=0.99, decode_tokens_per_s=40.0))
    assert board.estimate(model, 400).ahead == 1  # KV cache full: waits for a slot
    board.update(report(engine="vllm", running=30, waiting=59, kv_cache_usage=0.9, decode_tokens_per_s=40.0))
    estimate = board.estimate(model, 400)
    # 60 slots to free (the waiting and this call's) at 30 in parallel: two calls' time, then its own.
    assert (estimate.ahead, estimate.slots) == (60, 30)
    assert estimate.finish_s == pytest.approx(10.0 * 3)


@pytest.mark.unit
def test_stale_reports_and_models_without_engine_metrics_give_no_estimate(catalog):
    board = LoadBoard(stale_s=2.0)
    board.update(report(running=1, waiting=50), received=time.monotonic() - 3)
    assert board.estimate(catalog.model(LOCAL), 100) is None
    # A replay model reports only its calls in flight: its queue discipline is unknown.
    board.update(LocalLoad(model=REPLAY_LOCAL, replica="r1", in_flight=40, time_ms=now_ms()))
    assert board.estimate(catalog.model(REPLAY_LOCAL), 100) is None


@pytest.mark.unit
def test_the_spill_model_is_the_next_allowed_tier_up_never_outside_the_allow_list(catalog):
    local = catalog.model(LOCAL)
    assert spill_target(local, [LOCAL, MID], catalog).name == MID
    assert spill_target(local, None, catalog).name == MID
    # Mid not allowed: the next allowed tier up.
    assert spill_target(local, [LOCAL, FRONTIER], catalog).name == FRONTIER
    # Nothing allowed above: no spill (never down, never sideways to another local model).
    assert spill_target(local, [LOCAL], catalog) is None
    assert spill_target(local, [LOCAL, REPLAY_LOCAL, "gpt-5"], catalog) is None
    assert spill_target(catalog.model(FRONTIER), None, catalog) is None


# -- the router's decision, against test peers (no engine) --


@pytest.fixture
async def peers(settings, start_service, nc):
    """The router, with test peers for inference (records what it is sent) and budgets (grants)."""
    peer = await InferencePeer(nc, settings.subjects).start()
    await BudgetPeer(nc, settings.subjects).start()
    await start_service("router", settings)
    await nc.flush()
    return peer


def small_draft(content: str = "Draft a reply.", **fields) -> StepRequest:
    """A draft (routing.toml sends drafts to the local tier) that may spill to the mid tier."""
    draft = {"role": "draft", "workflow": "research", "step_id": "draft", "max_tokens": 64}
    return make_step(content, **(draft | {"allow_models": [LOCAL, MID]} | fields))


# Probes: steps of their own tenant, whose answers show what the router has taken in so far.
PROBE = "probe"


def probe_step(number: int, **fields) -> StepRequest:
    fields.setdefault("allow_models", [LOCAL, FRONTIER])  # spills to the frontier: MID may be killed
    return small_draft(f"probe {number}", **({"tenant": PROBE} | fields))


def routed(peer: InferencePeer) -> list[InferenceRequest]:
    """What the router sent to inference, the probes' calls left out."""
    return [request for request, _ in peer.requests if request.tenant != PROBE]


async def busy(nc, settings, spilled: Callable[[InferenceResult], bool] = lambda r: r.spilled_from == LOCAL) -> None:
    """Reports the real local model's engine as one generating and 20 queued, until the router acts
    on it: a probe step (``spilled``: how its answer shows a spill) goes one tier up."""
    probes = itertools.count()

    async def spills() -> bool:
        load = report(running=1, waiting=20, decode_tokens_per_s=100.0)
        await nc.publish(settings.subjects.local_load(LOCAL), encode(load))
        return spilled(await ask(nc, settings, probe_step(next(probes))))

    await eventually(spills, timeout_s=5, message="the router never acted on the load report")


@pytest.mark.infra
async def test_the_router_spills_on_a_reported_queue_and_says_so(settings, peers, nc):
    await busy(nc, settings)
    # 21 calls of 64 tokens at 100 tokens/s ahead of and including this one: 13.4 s, past 5 s.
    result = await ask(nc, settings, small_draft())

    assert (result.model, result.spilled_from) == (MID, LOCAL)
    [request] = routed(peers)
    assert (request.model, request.tier, request.spilled_from) == (MID, "mid", LOCAL)


@pytest.mark.infra
async def test_a_refused_spill_is_metered_as_spilled_and_the_call_runs_locally(settings, start_service, nc):
    await InferencePeer(nc, settings.subjects).start()
    budget = await BudgetPeer(nc, settings.subjects, refuse="over the cap").start()
    usage = await nc.subscribe(settings.subjects.usage_all)
    await start_service("router", settings)
    await nc.flush()
    # Every call is refused: a probe's spill shows as a reservation asked for the frontier.
    await busy(nc, settings, lambda _: any(r.tenant == PROBE and r.model == FRONTIER for r in budget.reserved))

    result = await ask(nc, settings, small_draft())

    rows: list[UsageEvent] = []
    while len(rows) < 2:
        event = msgspec.json.decode((await usage.next_msg(timeout=2)).data, type=UsageEvent)
        rows += [event] if event.tenant != PROBE else []
    # The router meters both refusals itself; the spilled one says where it came from.
    assert [(r.model, r.outcome, r.spilled_from) for r in rows] == [(MID, "refused", LOCAL), (LOCAL, "refused", "")]
    assert (result.model, result.spilled_from, result.error.kind) == (LOCAL, "", "refused")


@pytest.mark.infra
async def test_the_router_keeps_the_call_local_when_pinned_paced_killed_or_cached(settings, peers, nc, bus):
    # Cached first, while the engine is idle; then the same step under load is a free, instant hit.
    first = await ask(nc, settings, small_draft("cached"))
    await busy(nc, settings)
    again = await ask(nc, settings, small_draft("cached"))
    assert (first.model, again.model, again.cache_hit, again.spilled_from) == (LOCAL, LOCAL, True, "")
    # Nothing allowed above the local tier.
    pinned = await ask(nc, settings, small_draft("pinned", allow_models=[LOCAL]))
    # A kill switch on the spill model, once the router has it.
    switch = kill_switch("model", MID)
    await set_kill(bus, switch)
    probes = itertools.count()

    async def mid_killed() -> bool:
        probe = await ask(nc, settings, probe_step(next(probes), allow_models=[MID]))
        return probe.error is not None and probe.error.kind == "killed"

    await eventually(mid_killed, timeout_s=3)
    await busy(nc, settings)
    killed = await ask(nc, settings, small_draft("killed"))
    await set_kill(bus, msgspec.structs.replace(switch, tripped=False))
    # Ahead of the month's curve the mesh spends less, not more: once the router has the pace, a
    # review of the tenant (the frontier tier) goes to the mid tier.
    await set_pace(bus, pace_signal("acme", "downgrade"))

    async def downgraded() -> bool:
        probe = await ask(nc, settings, probe_step(next(probes), tenant="acme", role="review", allow_models=None))
        return probe.model == MID

    await eventually(downgraded, timeout_s=3)
    await busy(nc, settings)
    paced = await ask(nc, settings, small_draft("paced"))

    assert [(r.model, r.spilled_from) for r in (pinned, killed, paced)] == [(LOCAL, "")] * 3
    assert [r.model for r in routed(peers) if not r.messages[0].content.startswith("probe")] == [LOCAL] * 4


@pytest.mark.infra
async def test_a_stale_report_does_not_spill(settings, start_service, nc):
    peer = await InferencePeer(nc, settings.subjects).start()
    await BudgetPeer(nc, settings.subjects).start()
    await start_service("router", settings, load_stale_s=0.2)
    await nc.flush()
    await busy(nc, settings)
    await asyncio.sleep(0.3)  # the time under test: the router's last report grows older than 0.2 s

    result = await ask(nc, settings, small_draft())

    assert (result.model, result.spilled_from) == (LOCAL, "") and [r.model for r in routed(peer)] == [LOCAL]


# -- the whole path on the real engine --

# Calls queued on the engine (it takes 64). The step may write 256 tokens, so 49 calls of 256 pass its
# 10 s deadline at any decode rate below ~1,250 tokens/s (SmolLM2-135M does about 100 on 2 threads);
# its schema lets it write only a few, so on an idle engine it ends in time even on a busy machine.
SATURATING = 48
LABEL = {"type": "object", "properties": {"label": {"enum": ["easy", "hard"]}}, "required": ["label"]}
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


async def generate(http: httpx.AsyncClient, base_url: str) -> None:
    """One long streamed generation, straight to the engine (not through the mesh)."""
    body = {"model": LOCAL, "messages": STORY, "max_tokens": 400, "stream": True}
    async with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        async for _ in response.aiter_lines():
            pass


@contextlib.asynccontextmanager
async def saturated(base_url: str):
    """The engine busy with SATURATING long generations (one running, the rest waiting); they
    are cancelled on the way out, which stops them on the engine."""
    async with httpx.AsyncClient(timeout=120) as http:
        tasks = [asyncio.create_task(generate(http, base_url)) for _ in range(SATURATING)]
        try:
            deadline = time.monotonic() + 30
            while True:
                load = await asyncio.to_thread(engine_metrics, base_url)
                if load["llamacpp:requests_processing"] + load["llamacpp:requests_deferred"] >= SATURATING:
                    break
                assert time.monotonic() < deadline, f"engine never saturated: {load}"
                await asyncio.sleep(0.05)
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    await wait_engine_idle(base_url)


@pytest.fixture(scope="module")
def prompt(data_dir) -> str:
    """A recorded prompt, so the mid tier's replay backend has an answer for it."""
    recorded = load_recorded_outcomes(data_dir)
    return next(
        r.prompt for r in recorded if r.dataset == "gsm8k" and r.responses.get("mistralai/Mixtral-8x7B-Instruct-v0.1")
    )


def draft(prompt: str, *, allow_models: list[str], deadline_s: float = 10.0) -> StepRequest:
    """A draft (routing.toml sends drafts to the local tier, so to the real local model when
    ``allow_models`` names it) that labels a recorded prompt: a short answer under the schema."""
    return StepRequest(
        task_id=f"task-{time.monotonic_ns()}",
        step_id="draft",
        tenant="acme",
        workflow="research",
        role="draft",
        messages=[
            ChatMessage(role="system", content="Say whether the user's problem is easy or hard."),
            # The mid tier's replay backend answers the recorded prompt, the first user message.
            ChatMessage(role="user", content=prompt),
        ],
        max_tokens=256,
        response_schema=LABEL,
        allow_models=allow_models,
        deadline_ms=now_ms() + int(deadline_s * 1000),
    )


USAGE_COLUMNS = "service, tier, model, requested_model, outcome, spilled_from, cost_usd"


async def loads_seen(nc, settings, condition, count: int = 2) -> LocalLoad:
    """Waits for ``count`` load reports in a row that meet ``condition``: by the second, the
    router (subscribed before the test's listener) has taken the first."""
    sub = await nc.subscribe(settings.subjects.local_load(LOCAL))
    try:
        met = 0
        deadline = time.monotonic() + 15
        while met < count:
            assert time.monotonic() < deadline, "no load report met the condition"
            msg = await sub.next_msg(timeout=5)
            load = msgspec.json.decode(msg.data, type=LocalLoad)
            met = met + 1 if condition(load) else 0
        return load
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def mesh(engine_settings, local_engine, start_service, nc):
    """Accountant, local-inference on the real engine, cloud-inference (replay), router."""
    await wait_engine_idle(local_engine)  # the session's engine came up warm (conftest.local_engine)
    await start_service("accountant", engine_settings, database=engine_settings.subject_prefix)
    await start_service("local-inference", engine_settings)
    await start_service("cloud-inference", engine_settings)
    await start_service("router", engine_settings)
    await nc.flush()
    return engine_settings


@pytest.mark.infra
@pytest.mark.engine
async def test_local_inference_publishes_the_engines_load(mesh, nc):
    load = await loads_seen(nc, mesh, lambda load: load.engine == "llamacpp", count=1)
    assert (load.model, load.running, load.waiting, load.in_flight) == (LOCAL, 0, 0, 0)
    assert load.endpoint == metrics_url(mesh.local_engine_url) and 0 <= load.kv_cache_usage <= 1


@pytest.mark.infra
@pytest.mark.engine
async def test_with_an_idle_engine_the_step_runs_locally(mesh, nc, clickhouse_url, prompt):
    await loads_seen(nc, mesh, lambda load: load.engine == "llamacpp" and load.running + load.waiting == 0)

    result = await ask(nc, mesh, draft(prompt, allow_models=[LOCAL, MID]), timeout_s=30)

    assert result.error is None and result.model == LOCAL and result.spilled_from == ""
    row = await usage_row(clickhouse_url, mesh.subject_prefix, result.call_id, USAGE_COLUMNS)
    assert (row["service"], row["model"], row["outcome"], row["spilled_from"]) == ("local-inference", LOCAL, "ok", "")


@pytest.mark.infra
@pytest.mark.engine
async def test_a_saturated_engine_spills_the_step_to_the_next_tier(mesh, nc, clickhouse_url, prompt):
    async with saturated(mesh.local_engine_url):
        load = await loads_seen(nc, mesh, lambda load: load.running + load.waiting >= SATURATING)
        assert load.running == 1 and load.waiting >= SATURATING - 1

        started = time.monotonic()
        result = await ask(nc, mesh, draft(prompt, allow_models=[LOCAL, MID]), timeout_s=30)
        spilled_in_s = time.monotonic() - started

        # Pinned to the local model alone, the same step has nowhere to go: it waits its turn.
        pinned = await ask(nc, mesh, draft(prompt, allow_models=[LOCAL], deadline_s=1.0), timeout_s=30)

    assert result.error is None and result.output
    assert (result.model, result.tier, result.spilled_from) == (MID, "mid", LOCAL)
    assert spilled_in_s < 5.0
    row = await usage_row(clickhouse_url, mesh.subject_prefix, result.call_id, USAGE_COLUMNS)
    assert (row["service"], row["tier"], row["model"], row["outcome"]) == ("cloud-inference", "mid", MID, "ok")
    assert row["spilled_from"] == LOCAL and result.cost_usd > 0
    assert float(row["cost_usd"]) == pytest.approx(result.cost_usd)

    assert pinned.model == LOCAL and pinned.spilled_from == ""
    assert pinned.error is not None and pinned.error.kind == "timeout"
    pinned_row = await usage_row(clickhouse_url, mesh.subject_prefix, pinned.call_id, USAGE_COLUMNS)
    assert (pinned_row["model"], pinned_row["outcome"], pinned_row["spilled_from"]) == (LOCAL, "timeout", "")
