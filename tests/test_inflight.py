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
from nats.errors import NoRespondersError

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
        return msg.data

    server = RequestServer(bus, bus.subjects.bench_echo, "workers", handle, capacity=10)
    await server.start()
    await bus.flush()

    failed = msgspec.json.decode((await nc.request(settings.subjects.bench_echo, b"boom", timeout=5)).data)
    assert failed["error"]["kind"] == "unavailable" and "RuntimeError('boom')" in failed["error"]["message"]
    assert (await nc.request(settings.subjects.bench_echo, b"fine", timeout=5)).data == b"fine"
    await server.stop()
