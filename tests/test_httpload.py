"""The HTTP load generator of the gateway benchmarks, against the real zero-latency upstream
(``loadtest.upstream`` in its own process on loopback)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from loadtest.bench.litellm import start_upstream
from loadtest.httpload import Post, drive
from services.embedded.servers import stop_process


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    process, base_url = start_upstream()
    try:
        yield base_url
    finally:
        stop_process(process)


@pytest.mark.infra
@pytest.mark.parametrize("stream", [False, True])
async def test_every_call_completes_at_a_modest_rate(upstream: str, stream: bool) -> None:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Say 42."}], "stream": stream})
    post = Post.json(f"{upstream}/chat/completions", body.encode(), {"Authorization": "Bearer test"})
    run = await drive(post, rate_per_s=200, count=100, timeout_s=5)
    assert all(latency is not None and latency > 0 for latency in run.latencies_ms)
    # Paced, not bunched: the last of 100 calls at 200/s starts at 0.495 s (the bound above leaves
    # room for a shared CI machine).
    assert 0.49 < run.span_s < 1.5
    assert run.wall_s < run.span_s + 2


@pytest.mark.unit
async def test_refused_connections_are_failed_calls() -> None:
    with socket.socket() as listener:  # a port nothing listens on once this closes
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    post = Post.json(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}")
    run = await drive(post, rate_per_s=100, count=5, timeout_s=2)
    assert run.latencies_ms == [None] * 5
