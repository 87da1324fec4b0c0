"""Load testing with recorded traffic: traces become tasks, the mesh serves them on the synthetic
backend, and the zero-loss check holds. The six services run as processes (once for the module)
on the session's nats-server and ClickHouse, with their own subject prefix."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import uuid

import pytest
from click.testing import CliRunner

from loadtest.deploy import LOADTEST_MODELS, loadtest_deploy_dir
from loadtest.prompts import BLOCK_TOKENS, prompt_text
from loadtest.record import Recorder
from loadtest.replay import ReplayOptions, replay
from loadtest.traces import SHIPPED, TraceRow, read_trace, resolve_trace
from schemas.messages import ChatMessage, InferenceRequest, Usage
from services.cli.loadtest_commands import loadtest
from services.embedded.stack import Stack
from services.inference.latency import latency_s
from services.inference.prefix_cache import PrefixCache
from services.inference.synthetic import WORDS, SyntheticBackend
from services.runtime.catalog import Catalog
from services.runtime.settings import MeshSettings
from services.runtime.tokens import count_tokens


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """The load-test deploy directory, its latency model shrunk to milliseconds so tests stay fast,
    and every model caching prefixes (long prompts go to the frontier, which ships without)."""
    path = loadtest_deploy_dir(tmp_path_factory.mktemp("deploy") / "deploy")
    models = LOADTEST_MODELS.read_text()
    models = re.sub(r"(?m)^prompt_cache_block_tokens = .*\n", "", models)
    models = re.sub(r"(?m)^ttft_ms = .*$", "ttft_ms = 2\nprompt_cache_block_tokens = 16", models)
    models = re.sub(r"(?m)^(output|prefill)_tokens_per_s = .*$", r"\1_tokens_per_s = 100000", models)
    (path / "models.toml").write_text(models)
    return path


@pytest.fixture(scope="module")
def mesh(infra, data_dir, deploy, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = MeshSettings(
        nats_url=infra[0],
        clickhouse_url=infra[1],
        subject_prefix="lt" + uuid.uuid4().hex[:8],
        data=data_dir,
        deploy_dir=deploy,
        home=home,
    )
    with pytest.MonkeyPatch.context() as env:
        # The stack uses the servers the environment names and gives its services the deploy dir, home
        # and subject prefix of its settings; the CLI commands run here read deploy dir and prefix from
        # the environment, as a user's do.
        env.setenv("NATS_URL", infra[0])
        env.setenv("CLICKHOUSE_URL", infra[1])
        env.setenv("FRUGALMESH_DEPLOY_DIR", str(deploy))
        env.setenv("FRUGALMESH_SUBJECT_PREFIX", settings.subject_prefix)
        with Stack(home=home, settings=settings) as stack:
            yield stack.settings


def fast(rows: list[TraceRow]) -> ReplayOptions:
    """A speed that replays ``rows`` within about half a second, whatever their recorded span."""
    span = rows[-1].arrival_s - rows[0].arrival_s
    return ReplayOptions(speed=max(1.0, span / 0.5), deadline_s=60, salt=uuid.uuid4().hex)


# -- the parts --


@pytest.mark.unit
def test_latency_model_is_time_to_first_token_plus_uncached_prefill_plus_decode():
    catalog = Catalog.load(LOADTEST_MODELS.parent)
    gpt4 = catalog.model("gpt-4-1106-preview")
    usage = Usage(input_tokens=3000, cached_input_tokens=1000, output_tokens=50)
    expected = gpt4.ttft_ms / 1000 + 2000 / gpt4.prefill_tokens_per_s + 50 / gpt4.output_tokens_per_s
    assert latency_s(gpt4, usage) == pytest.approx(expected)
    # Off unless configured: the production catalogue's replay backend answers at once.
    production = Catalog.load(MeshSettings().deploy_dir)
    assert all(latency_s(m, Usage(output_tokens=1000)) == 0 for m in production.models.values())


@pytest.mark.unit
async def test_synthetic_backend_answers_any_prompt_with_max_tokens_real_tokens(deploy):
    catalog = Catalog.load(deploy)
    backend = SyntheticBackend()
    for model in catalog.models.values():
        request = InferenceRequest(
            call_id="c", task_id="t", step_id="s", model=model.name, tier=model.tier,
            messages=[ChatMessage(role="user", content="no recording has this prompt")],
            max_tokens=37, deadline_ms=0,
        )  # fmt: skip
        completion = await backend.complete(model, request)
        assert completion.usage.output_tokens == 37 == count_tokens(model.tokenizer, completion.output)
        assert completion.usage.input_tokens > 5


@pytest.mark.unit
def test_prefix_cache_hits_whole_blocks_as_far_as_the_prefix_agrees():
    cache = PrefixCache(block_tokens=4, capacity_tokens=40)
    assert cache.serve(list(range(10))) == 0
    # Same first 9 tokens: the two whole blocks hit, the partial third was never cached.
    assert cache.serve([*range(9), 99, 5, 5]) == 8
    assert cache.serve([*range(6), 99, 99, 8, 9]) == 4  # the second block differs: only the first hits
    assert cache.serve([1, *range(1, 10)]) == 0  # a block is known by everything before it, too
    # 40 tokens hold 10 blocks: ten new blocks push every older one out, least recently used first.
    cache.serve(list(range(100, 140)))
    assert cache.serve(list(range(8))) == 0


@pytest.mark.unit
async def test_synthetic_backend_reports_the_prefix_its_engine_cached():
    local = Catalog.load(LOADTEST_MODELS.parent).model("mixtral-8x7b-local")
    assert local.prompt_cache_block_tokens == 16
    backend = SyntheticBackend()
    shared = " ".join(WORDS) * 4  # 256 words, one token each

    def request(content: str) -> InferenceRequest:
        return InferenceRequest(
            call_id="c", task_id="t", step_id="s", model=local.name, tier=local.tier,
            messages=[ChatMessage(role="user", content=content)], max_tokens=4, deadline_ms=0,
        )  # fmt: skip

    first = await backend.complete(local, request(shared + " first question"))
    second = await backend.complete(local, request(shared + " second question"))
    assert first.usage.cached_input_tokens == 0
    assert second.usage.cached_input_tokens == 256 < second.usage.input_tokens
    priced = dataclasses.replace(local, cached_input_usd_per_mtok=local.input_usd_per_mtok / 10)
    assert priced.cost(second.usage) < priced.cost(first.usage)


@pytest.mark.unit
def test_prompts_have_the_recorded_length_and_share_prefixes_by_block_id():
    assert all(count_tokens("cl100k", " " + w) == 1 == count_tokens("mistral-v1", w) for w in WORDS)
    a = TraceRow(arrival_s=0, input_tokens=1300, output_tokens=5, prefix_ids=("m:0", "m:1", "m:2"))
    b = TraceRow(arrival_s=0, input_tokens=1100, output_tokens=5, prefix_ids=("m:0", "m:1", "m:9"))
    text_a, text_b = prompt_text(a, "a"), prompt_text(b, "b")
    for tok in ("cl100k", "mistral-v1"):
        assert count_tokens(tok, text_a) == 1300 and count_tokens(tok, text_b) == 1100
    shared = len(" ".join(text_a.split()[: 2 * BLOCK_TOKENS]))
    assert text_a[:shared] == text_b[:shared] and text_a.split()[1024] != text_b.split()[1024]
    # Without block ids every row is its own prompt; a salt renames every block.
    plain = TraceRow(arrival_s=0, input_tokens=100, output_tokens=5)
    assert prompt_text(plain, "x") != prompt_text(plain, "y")
    assert prompt_text(a, "a", salt="s1")[:100] != text_a[:100]


@pytest.mark.unit
@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_shipped_trace_reads_as_rows_from_time_zero(name, data_dir):
    rows = read_trace(resolve_trace(name, data_dir), limit=200)
    assert len(rows) == 200 and rows[0].arrival_s == 0
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(rows))
    assert all(r.input_tokens > 0 and r.output_tokens is not None for r in rows)
    if name.startswith("mooncake"):
        assert all(len(r.prefix_ids) == -(-r.input_tokens // BLOCK_TOKENS) for r in rows)
    assert read_trace(resolve_trace(name, data_dir), duration_s=0.0)[-1].arrival_s == 0


# -- end to end --


@pytest.mark.infra
@pytest.mark.parametrize("name", list(SHIPPED))
async def test_short_replay_of_each_shipped_trace_loses_nothing(name, mesh, data_dir):
    rows = read_trace(resolve_trace(name, data_dir), limit=20)
    report = await replay(mesh, rows, fast(rows))
    assert report.zero_loss.ok, report.zero_loss
    assert report.published == 20 and report.outcomes["done"] == 20, report.outcomes
    assert report.calls == report.zero_loss.calls_reported >= 20
    assert report.e2e_latency_ms.n == 20 and report.mesh_overhead_ms.p50 > 0
    assert report.spend_usd > 0
    # Mooncake's conversations share prefixes (19 of the first 20 rows' 579 blocks repeat an
    # earlier row's); Azure's rows have no block ids, so nothing they send was sent before.
    if name == "mooncake-conversation":
        assert 0 < report.cached_input_share < 0.2
    elif name.startswith("azure"):
        assert report.cached_input_share == 0


@pytest.mark.infra
async def test_record_then_replay_gives_the_same_tasks(mesh, data_dir, tmp_path):
    rows = read_trace(resolve_trace("azure-code", data_dir), limit=12)
    recorder = Recorder(mesh)
    stop = asyncio.Event()
    recording = asyncio.create_task(recorder.record(duration_s=None, stop=stop, grace_s=20))
    await asyncio.sleep(0.3)  # the recorder's subscriptions are in place
    first = await replay(mesh, rows, fast(rows))
    stop.set()
    await recording
    out = tmp_path / "recording.jsonl"
    assert recorder.write(out) == first.published == 12
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["input_tokens"] for line in lines] == [r.input_tokens for r in rows]
    assert [line["output_tokens"] for line in lines] == [r.output_tokens for r in rows]

    again = read_trace(out)
    second = await replay(mesh, again, fast(again))
    assert second.zero_loss.ok and second.published == first.published == second.zero_loss.ended


@pytest.mark.infra
def test_cli_replays_a_recording_and_writes_the_json_report(mesh, tmp_path):
    trace = tmp_path / "tiny.jsonl"
    trace.write_text(
        "".join(json.dumps({"v": 1, "arrival_ms": 10 * i, "input_tokens": 600, "output_tokens": 8,
                            "prefix_hashes": ["same", f"own{i}"]}) + "\n" for i in range(5))
    )  # fmt: skip
    out = tmp_path / "report.json"
    env = {"FRUGALMESH_HOME": str(mesh.home), "NATS_URL": mesh.nats_url, "CLICKHOUSE_URL": mesh.clickhouse_url}
    result = CliRunner().invoke(loadtest, ["replay", str(trace), "--json", "--speed", "10", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["zero_loss"]["ok"] and report["outcomes"]["done"] == 5
    for figure in ("e2e_latency_ms", "mesh_overhead_ms"):
        assert set(report[figure]) == {"n", "p50", "p95", "p99", "max"}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "option"),
    [(["--speed", "0"], "--speed"), (["--limit", "0"], "--limit"), (["--deadline", "-1"], "--deadline")],
)
def test_cli_refuses_a_bad_option_before_starting_anything(args, option):
    result = CliRunner().invoke(loadtest, ["replay", "azure-conv", *args])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output


@pytest.mark.infra
async def test_the_report_says_why_tasks_did_not_end_done(mesh):
    rows = [TraceRow(arrival_s=i / 100, input_tokens=50, output_tokens=5) for i in range(3)]
    options = dataclasses.replace(fast(rows), workflow="no-such-workflow")
    report = await replay(mesh, rows, options)
    assert report.zero_loss.ok and report.outcomes["done"] == 0
    ((reason, count),) = report.not_done_reasons.items()
    assert count == 3 and "no-such-workflow" in reason, reason
