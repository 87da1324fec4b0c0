"""The HTTP load generator of the gateway benchmarks, against the real upstream (``loadtest.upstream``
in its own process on loopback, answering at once or on a model-like schedule)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from loadtest.bench.litellm import start_upstream
from loadtest.httpload import Post, drive
from loadtest.upstream import Latency
from services.embedded.servers import stop_process

# 100 ms to the first token, then one every 10 ms: 5 tokens, 140 ms a call.
MODEL_LIKE = Latency(ttft_ms=100, token_ms=10, tokens=5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    process, base_url = start_upstream()
    try:
        yield base_url
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def model_like_upstream() -> Iterator[str]:
    process, base_url = start_upstream(MODEL_LIKE)
    try:
        yield base_url
    finally:
        stop_process(process)


def chat(base_url: str, stream: bool) -> Post:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say 42."}], "stream": stream})
    return Post.json(f"{base_url}/chat/completions", body.encode(), {"Authorization": "Bearer test"})


@pytest.mark.infra
@pytest.mark.parametrize("stream", [False, True])
async def test_every_call_completes_at_a_modest_rate(upstream: str, stream: bool) -> None:
    run = await drive(chat(upstream, stream), rate_per_s=200, count=100, timeout_s=5)
    assert all(latency is not None and latency > 0 for latency in run.latencies_ms)
    assert all(
        first is not None and 0 < first <= latency
        for first, latency in zip(run.first_byte_ms, run.latencies_ms, strict=True)
        if latency is not None
    )
    # Paced, not bunched: the last of 100 calls at 200/s starts at 0.495 s (the bound above leaves
    # room for a shared CI machine).
    assert 0.49 < run.span_s < 1.5
    assert run.wall_s < run.span_s + 2
    assert run.in_flight_max >= 1 and run.in_flight_mean >= 1


@pytest.mark.infra
async def test_a_model_like_stream_starts_at_its_first_token_and_calls_overlap(model_like_upstream: str) -> None:
    run = await drive(chat(model_like_upstream, True), rate_per_s=50, count=20, timeout_s=5)
    latencies = [v for v in run.latencies_ms if v is not None]
    firsts = [v for v in run.first_byte_ms if v is not None]
    assert len(latencies) == len(firsts) == 20
    # The response head leaves at once; the first body byte (the first event) at the first token.
    assert all(MODEL_LIKE.ttft_ms * 0.95 <= first < MODEL_LIKE.total_ms for first in firsts)
    assert all(latency >= MODEL_LIKE.total_ms * 0.95 for latency in latencies)
    # 140 ms calls started every 20 ms: about 7 at once, none waiting for another.
    assert run.in_flight_max >= 4


@pytest.mark.infra
async def test_a_model_like_answer_that_is_not_streamed_comes_whole_at_the_last_token(model_like_upstream: str) -> None:
    run = await drive(chat(model_like_upstream, False), rate_per_s=50, count=5, timeout_s=5)
    assert all(
        latency is not None and first is not None and first >= MODEL_LIKE.total_ms * 0.95
        for first, latency in zip(run.first_byte_ms, run.latencies_ms, strict=True)
    )


@pytest.mark.unit
def test_a_varying_post_numbers_each_body_at_the_same_length() -> None:
    post = Post.json("http://127.0.0.1:9/v1/x", b'{"content": "Say 42 (####)"}', marker=b"####")
    assert bytes(post.body_for(0).data) == b'{"content": "Say 42 (0000)"}'
    assert bytes(post.body_for(37).data) == b'{"content": "Say 42 (0037)"}'
    assert len({len(post.body_for(n).data) for n in (0, 9, 99, 9999)}) == 1
    with pytest.raises(ValueError, match="marker"):
        Post.json("http://127.0.0.1:9/v1/x", b"{}", marker=b"####")


@pytest.fixture
async def recording_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An in-process HTTP/1.1 server that keeps every request body and answers 200 with an empty body."""
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length"))
                bodies.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], bodies


@pytest.mark.unit
async def test_every_call_of_a_varying_post_sends_its_own_body(recording_server: tuple[int, list[bytes]]) -> None:
    port, bodies = recording_server
    post = Post.json(f"http://127.0.0.1:{port}/v1/x", b'{"n": "######"}', marker=b"######")
    run = await drive(post, rate_per_s=500, count=50, timeout_s=2)
    assert all(latency is not None for latency in run.latencies_ms)
    # An empty body has no first byte.
    assert run.first_byte_ms == [None] * 50
    assert sorted(bodies) == [b'{"n": "%06d"}' % n for n in range(50)]


@pytest.mark.unit
async def test_refused_connections_are_failed_calls() -> None:
    with socket.socket() as listener:  # a port nothing listens on once this closes
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    post = Post.json(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}")
    run = await drive(post, rate_per_s=100, count=5, timeout_s=2)
    assert run.latencies_ms == [None] * 5
