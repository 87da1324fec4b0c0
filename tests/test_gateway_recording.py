"""Recorded gateway traffic: a gateway with ``gateway_record`` set writes one line per chat request
(its arrival, body, shape, status, usage, cost, latency; never the key), and `frugalmesh loadtest
replay` sends such a recording to a gateway again, open loop, and reports every request answered
and one usage row per call.

The parts first (unit: the line of a hand-made exchange, the recorder around a stand-in ASGI app,
reading a recording), then the whole (infra: the openai SDK through a live gateway on the real
stack, its recording replayed by the CLI against a second replica)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest
from click.testing import CliRunner
from faststream import FastStream

from loadtest.gateway_traffic import is_gateway_recording, read_gateway_recording, replay_headers, salted
from schemas.messages import VirtualKey
from services.cli.loadtest_commands import loadtest
from services.gateway.keys import KeyStore
from services.gateway.recording import Exchange, GatewayRecorder, record_line
from services.runtime.settings import MeshSettings

FRONTIER = "gpt-4-1106-preview"  # on provider openai: the fake API
HELLO = [{"role": "user", "content": "Say the answer."}]
SECRET = "fm-" + "s" * 43
KEY = VirtualKey(id="fmk_0123456789abcdef", tenant="acme", created_ms=0)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
FIELDS = {
    "v", "source", "ts_ms", "t_ms", "tenant", "key_id", "headers", "model", "stream", "messages", "tools",
    "response_format", "max_tokens", "request", "status", "outcome", "error", "call_id", "task_id", "served_model",
    "tier", "cache_hit", "finish_reason", "usage", "cost_usd", "latency_ms", "ttft_ms",
}  # fmt: skip


def chunk(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


# -- the parts --


@pytest.mark.unit
def test_a_streams_line_takes_usage_and_cost_from_its_finishing_chunk_and_times_its_first_byte():
    cost = {"cost_usd": 0.5, "call_id": "c1", "model": FRONTIER, "tier": "frontier", "cache_hit": False, "task_id": "t"}
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 1}}
    exchange = Exchange(time.time() * 1000, 10.0, "acme", KEY.id, {"x-frugalmesh-task": "t"})
    request = {"model": FRONTIER, "messages": HELLO, "stream": True, "tools": [WEATHER]}
    exchange.body.append(json.dumps(request).encode())
    headers = [(b"content-type", b"text/event-stream"), (b"x-frugalmesh-call-id", b"c1")]
    exchange.response_started({"status": 200, "headers": headers})
    exchange.first_byte, exchange.ended = 10.002, 10.010
    for data in (
        chunk({"choices": [{"delta": {"content": "The answer"}}]}),
        chunk({"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "usage": usage, "frugalmesh": cost}),
        b"data: [DONE]\n\n",
    ):
        exchange.response_body({"body": data, "more_body": True})
    exchange.response_body({"body": b"", "more_body": False})

    line = record_line(exchange, exchange.arrived_ms - 5)

    assert line.keys() == FIELDS
    assert (line["stream"], line["tools"], line["model"], line["t_ms"]) == (True, ["get_weather"], FRONTIER, 5.0)
    assert line["usage"] == {"input_tokens": 3, "output_tokens": 4, "cached_input_tokens": 1}
    assert (line["cost_usd"], line["call_id"], line["tier"]) == (0.5, "c1", "frontier")
    assert line["finish_reason"] == "tool_calls"
    assert (line["status"], line["outcome"], line["latency_ms"], line["ttft_ms"]) == (200, "ok", 10.0, 2.0)


@pytest.mark.unit
def test_a_stream_the_client_left_is_recorded_as_disconnected_and_a_body_that_is_not_json_as_text():
    exchange = Exchange(0.0, 0.0, None, None, {})
    exchange.body.append(b"{not json")
    exchange.response_started({"status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    exchange.response_body({"body": chunk({"choices": [{"delta": {"content": "x"}}]}), "more_body": True})

    line = record_line(exchange, 0.0)

    assert (line["outcome"], line["request"], line["request_text"]) == ("disconnected", None, "{not json")


@pytest.mark.unit
async def test_the_recorder_writes_every_request_it_wraps_at_close_and_never_the_key(tmp_path):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 429, "headers": [(b"x-frugalmesh-call-id", b"c9")]})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "over the cap"}}'})

    class Log:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    path = tmp_path / "rec" / "gateway.jsonl"
    recorder = await GatewayRecorder.open(path, {SECRET: KEY}.get, Log())
    wrapped = recorder.wrap(app)
    headers = [(b"authorization", f"Bearer {SECRET}".encode()), (b"x-frugalmesh-task", b"run-1")]
    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": headers}
    body = json.dumps({"model": FRONTIER, "messages": HELLO}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        pass

    for _ in range(3):
        await wrapped(scope, receive, send)
    await recorder.close()

    text = path.read_text()
    assert SECRET not in text and "authorization" not in text.lower()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3 and path.stat().st_mode & 0o777 == 0o600
    assert {(x["key_id"], x["tenant"], x["status"], x["outcome"], x["call_id"]) for x in lines} == {
        (KEY.id, "acme", 429, "error", "c9")
    }
    assert lines[0]["headers"] == {"x-frugalmesh-task": "run-1"}
    assert lines[0]["error"] == {"message": "over the cap"}


@pytest.mark.unit
def test_a_recording_is_read_in_arrival_order_without_what_cannot_be_sent_again(tmp_path):
    def line(ts_ms: float, status: int = 200, request: object = None) -> str:
        request = request if request is not None else {"model": FRONTIER, "messages": HELLO}
        return json.dumps({"v": 1, "source": "gateway", "ts_ms": ts_ms, "status": status, "request": request})

    path = tmp_path / "gateway.jsonl"
    path.write_text("\n".join([line(1_000.0), line(500.0, 401), line(3_500.0), line(200.0, 200, "x"), line(1_500.0)]))

    traffic = read_gateway_recording(path)

    assert is_gateway_recording(path) and not is_gateway_recording(Path(__file__))
    assert [r.arrival_s for r in traffic.requests] == [0.0, 0.5, 2.5]
    assert traffic.skipped == {"refused for its key (401)": 1, "body not a JSON object": 1}
    assert [r.arrival_s for r in read_gateway_recording(path, limit=2, duration_s=0.4).requests] == [0.0]


@pytest.mark.unit
def test_a_replay_renames_recorded_tasks_and_salts_the_first_message_text(tmp_path):
    body = {"model": FRONTIER, "messages": [{"role": "system", "content": None}, {"role": "user", "content": "Hi"}]}
    path = tmp_path / "gateway.jsonl"
    line = {"source": "gateway", "ts_ms": 0, "request": body, "headers": {"x-frugalmesh-task": "r"}}
    path.write_text(json.dumps(line))
    [request] = read_gateway_recording(path).requests

    assert replay_headers(request, "abc") == {"x-frugalmesh-task": "r-abc"}
    assert salted(body, "s1")["messages"][1]["content"] == "[s1] Hi"
    assert body["messages"][1]["content"] == "Hi"  # the recording itself is untouched


# -- the whole --


@dataclass
class Recorded:
    settings: MeshSettings
    url: str  # the recording gateway's, ending /v1
    secret: str
    key: VirtualKey
    recording: Path
    gateway: FastStream

    def client(self, **options) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=self.secret, max_retries=0, **options)


@pytest.fixture
async def recorded(openai_settings, start_service, bus, tmp_path) -> Recorded:
    """Router, accountant, cloud-inference on the fake OpenAI API, and a gateway that records."""
    settings = openai_settings
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings)
    await start_service("router", settings)
    secret, key = await (await KeyStore.open(bus)).create("acme", name="tests")
    recording = tmp_path / "gateway.jsonl"
    urls: list[str] = []
    recording_settings = settings.model_copy(update={"gateway_record": str(recording)})
    gateway = await start_service("gateway", recording_settings, port=0, listening=urls.append)
    return Recorded(settings, urls[0] + "/v1", secret, key, recording, gateway)


@pytest.mark.infra
async def test_a_client_that_drops_a_stream_still_stops_the_provider_and_is_recorded_as_disconnected(
    recorded, fake_openai
):
    fake_openai.behaviour.reply = "word " * 60
    fake_openai.behaviour.token_delay_s = 0.05  # about 3 s in all
    stream = await recorded.client().chat.completions.create(model=FRONTIER, messages=HELLO, stream=True)
    async for chunk in stream:
        if (chunk.choices[0].delta.content or "").strip():
            break
    await stream.close()

    assert await asyncio.to_thread(fake_openai.disconnects.wait, 5), "the provider never saw the stream closed"
    await recorded.gateway.stop()
    [line] = [json.loads(text) for text in recorded.recording.read_text().splitlines()]
    assert (line["status"], line["outcome"], line["stream"]) == (200, "disconnected", True)
    assert line["ttft_ms"] is not None and line["call_id"]


@pytest.mark.infra
async def test_traffic_recorded_through_a_gateway_replays_against_another_with_every_call_answered_and_metered(
    recorded, start_service, tmp_path, monkeypatch
):
    settings, secret, key, recording = recorded.settings, recorded.secret, recorded.key, recorded.recording
    client = recorded.client()

    await client.chat.completions.create(
        model=FRONTIER, messages=HELLO, max_tokens=50, extra_headers={"X-Frugalmesh-Task": "agent-1"}
    )
    stream = await client.chat.completions.create(
        model=FRONTIER, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    async for _ in stream:
        pass
    await client.chat.completions.create(model=FRONTIER, messages=HELLO, tools=[WEATHER])
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "integer"}}}}
    await client.chat.completions.create(
        model=FRONTIER, messages=HELLO, response_format={"type": "json_schema", "json_schema": schema}
    )
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-9", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=recorded.url, api_key="fm-unknown", max_retries=0).chat.completions.create(
            model=FRONTIER, messages=HELLO
        )
    await recorded.gateway.stop()  # the recorder writes what is queued at shutdown

    text = recording.read_text()
    assert secret not in text and "authorization" not in text.lower() and "fm-unknown" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 6 and all(line.keys() >= FIELDS for line in lines)
    by_status = collections.Counter(line["status"] for line in lines)
    assert by_status == {200: 4, 404: 1, 401: 1}
    served = [line for line in lines if line["status"] == 200]
    assert {line["key_id"] for line in served} == {key.id}
    assert all(line["usage"]["input_tokens"] > 0 and line["cost_usd"] > 0 and line["call_id"] for line in served)
    [streamed] = [line for line in lines if line["stream"]]
    assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["latency_ms"]
    assert any(line["tools"] == ["get_weather"] and line["finish_reason"] == "tool_calls" for line in lines)
    assert any(line["response_format"] == "json_schema" for line in lines)
    assert any(line["headers"] == {"x-frugalmesh-task": "agent-1"} and line["max_tokens"] == 50 for line in lines)

    replica: list[str] = []
    await start_service("gateway", settings, port=0, listening=replica.append)
    database = urlsplit(settings.clickhouse_url)._replace(path="/" + settings.subject_prefix)
    report_file = tmp_path / "report.json"
    monkeypatch.setenv("FRUGALMESH_HOME", str(tmp_path / "home"))  # no `up` stack is consulted
    arguments = ["replay", str(recording), "--gateway", replica[0], "--key", secret, "--speed", "10"]
    arguments += ["--clickhouse", urlunsplit(database), "--salt", uuid.uuid4().hex, "--out", str(report_file), "--json"]
    # In a thread: the CLI runs its own event loop, and the services need this one to answer.
    result = await asyncio.to_thread(CliRunner().invoke, loadtest, arguments)

    report = json.loads(report_file.read_text())
    assert result.exit_code == 0, (result.output, report)
    assert report["skipped"] == {"refused for its key (401)": 1}
    assert (report["sent"], report["streamed"], report["statuses"]) == (5, 1, {"200": 4, "404": 1})
    assert report["cache_hits"] == 0 and report["spend_usd"] > 0
    assert (report["latency_ms"]["n"], report["ttft_ms"]["n"]) == (4, 1)
    zero_loss = report["zero_loss"]
    assert zero_loss["ok"] and (zero_loss["answered"], zero_loss["missing"]) == (5, 0)
    assert (zero_loss["calls_reported"], zero_loss["usage_rows"], zero_loss["calls_without_row"]) == (4, 4, 0)
