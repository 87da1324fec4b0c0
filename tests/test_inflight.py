"""Calls in flight (issue 15): a request waiting on a slow model costs a coroutine, not a worker slot,
and a full replica leaves its queue group so that the others get its excess.

First ``RequestServer`` itself (services/runtime/serve.py) on a real nats-server, then the real
router and inference service in front of a slow model (the fake OpenAI API, answering after seconds).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from fakes.deploy import openai_deploy
from fakes.openai_server import Behaviour, FakeOpenAI
from helpers import make_step
from mesh_client import request
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from schemas.messages import InferenceResult
from services.runtime.bus import Bus
from services.runtime.serve import RequestServer

pytestmark = pytest.mark.infra


async def serving(bus: Bus, capacity: int, delay_s: float, served: list[str]) -> RequestServer:
    async def handle(msg) -> bytes:
        await asyncio.sleep(delay_s)
        served.append(msg.data.decode())
        return msg.data

    server = RequestServer(bus, bus.subjects.bench_echo, "workers", handle, capacity=capacity)
    await server.start()
    await bus.flush()
    return server


async def test_hundreds_of_slow_requests_overlap_on_one_replica(bus, nc, settings):
    served: list[str] = []
    server = await serving(bus, capacity=1_000, delay_s=2.0, served=served)
    started = time.monotonic()

    replies = await asyncio.gather(
        *(nc.request(settings.subjects.bench_echo, str(n).encode(), timeout=10) for n in range(500))
    )

    elapsed = time.monotonic() - started
    assert sorted(int(r.data) for r in replies) == list(range(500))
    # One call's time, not 500 / slots of them.
    assert elapsed < 3.5, f"500 requests of 2 s took {elapsed:.1f} s: they queued"
    assert server.times_full == 0 and server.in_flight == 0
    await server.stop()


async def test_a_full_replica_leaves_the_queue_group_and_the_other_takes_the_excess(bus, nc, settings):
    small_served: list[str] = []
    large_served: list[str] = []
    small = await serving(bus, capacity=10, delay_s=1.0, served=small_served)
    second = Bus(settings, "second")
    await second.connect()
    large = await serving(second, capacity=1_000, delay_s=1.0, served=large_served)

    async def arriving(n: int):
        # Spread over 1.5 s as traffic arrives: a burst sent in one go is split among the members
        # by the server before any of them can say it is full.
        await asyncio.sleep(n * 0.005)
        return await nc.request(settings.subjects.bench_echo, str(n).encode(), timeout=10)

    replies = await asyncio.gather(*(arriving(n) for n in range(300)))

    assert len(replies) == 300 and len(small_served) + len(large_served) == 300
    # Queue groups spread evenly (about 150 each) unless the small replica steps aside when full:
    # it serves its 10 at a time, about a tenth of the 1.5 s of arrivals each.
    assert small.times_full >= 1 and len(small_served) < 60
    await asyncio.sleep(0.2)
    assert small.joined and small.in_flight == 0  # back in the group once it had room
    await small.stop()
    await large.stop()
    await second.close()


async def test_with_every_replica_full_a_requester_hears_no_responders_at_once(bus, nc, settings):
    served: list[str] = []
    server = await serving(bus, capacity=5, delay_s=1.0, served=served)
    first = [asyncio.ensure_future(nc.request(settings.subjects.bench_echo, b"x", timeout=5)) for _ in range(5)]
    await asyncio.sleep(0.2)

    started = time.monotonic()
    with pytest.raises(NoRespondersError):
        await nc.request(settings.subjects.bench_echo, b"late", timeout=5)
    assert time.monotonic() - started < 0.5  # said at once, not after a time-out

    assert len(await asyncio.gather(*first)) == 5
    await server.stop()


async def test_a_failing_handler_costs_one_request_and_its_caller_gets_the_reason(bus, nc, settings):
    async def handle(msg) -> bytes:
        if msg.data == b"boom":
            raise RuntimeError("boom")
        if msg.data == b"no leader":
            raise NoStreamResponseError  # JetStream not answering: the same request may succeed later
        return msg.data

    server = RequestServer(bus, bus.subjects.bench_echo, "workers", handle, capacity=10)
    await server.start()
    await bus.flush()

    failed = msgspec.json.decode((await nc.request(settings.subjects.bench_echo, b"boom", timeout=5)).data)
    assert failed["error"]["kind"] == "unavailable" and "RuntimeError('boom')" in failed["error"]["message"]
    assert failed["error"].get("retryable", False) is False
    transient = msgspec.json.decode((await nc.request(settings.subjects.bench_echo, b"no leader", timeout=5)).data)
    assert transient["error"]["kind"] == "unavailable" and transient["error"]["retryable"] is True
    assert (await nc.request(settings.subjects.bench_echo, b"fine", timeout=5)).data == b"fine"
    await server.stop()


FRONTIER = "gpt-4-1106-preview"  # on provider openai: the fake API in these tests


async def slow_mesh(settings, start_service, **inference_options) -> None:
    await start_service("accountant", settings, database=settings.subject_prefix, ack_wait_s=2.0, retry_delay_s=0.2)
    await start_service("cloud-inference", settings, **inference_options)
    await start_service("router", settings)


async def step_results(nc, settings, count: int, spread_s: float = 0.0) -> list[InferenceResult]:
    async def one(n: int) -> InferenceResult:
        await asyncio.sleep(n * spread_s / count)
        step = make_step(f"Question {n}?", task_id=f"task-{n}", allow_models=[FRONTIER], deadline_in_ms=30_000)
        return await request(nc, settings.subjects.step_request, step, InferenceResult, timeout_s=30)

    return await asyncio.gather(*(one(n) for n in range(count)))


async def test_hundreds_of_slow_model_calls_overlap_through_one_router_and_one_inference_replica(
    openai_settings, fake_openai, start_service, nc
):
    fake_openai.behaviour.delay_s = 3.0
    await slow_mesh(openai_settings, start_service)
    started = time.monotonic()

    results = await step_results(nc, openai_settings, 300)

    elapsed = time.monotonic() - started
    assert [r.error for r in results] == [None] * 300 and len(fake_openai.requests) == 300
    # Each call waits 3 s on the model: together they take about one call's time, not 300 / 64 of them.
    assert elapsed < 7.0, f"300 calls of 3 s took {elapsed:.1f} s through the mesh: they queued"


async def test_a_full_inference_replica_leaves_its_excess_to_the_other(
    openai_settings, fake_openai, start_service, nc, tmp_path
):
    """Two cloud-inference replicas, each calling its own fake API: the one that holds 10 calls at
    most takes a small share of 200 calls arriving over 2 s, the other the rest."""
    fake_openai.behaviour.delay_s = 1.0
    await slow_mesh(openai_settings, start_service, capacity=10)
    with FakeOpenAI(Behaviour(api_key="sk-test", delay_s=1.0)) as other:
        roomy = openai_settings.model_copy(update={"deploy_dir": openai_deploy(tmp_path / "other", other.url)})
        await start_service("cloud-inference", roomy)

        results = await step_results(nc, openai_settings, 200, spread_s=2.0)

        assert [r.error for r in results] == [None] * 200
        small, large = len(fake_openai.requests), len(other.requests)
        assert small + large == 200
        # An even split would be about 100 each: 10 at a time for 1 s each, over 2 s of arrivals.
        assert small < 50 < large, (small, large)
