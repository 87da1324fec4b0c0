"""The control plane: a switch set before a service starts is seen at start; later ones arrive pushed."""

import asyncio

from schemas.messages import KillSwitch, PaceSignal
from services.runtime.bus import now_ms
from services.runtime.streams import ensure_streams
from services.runtime.control import ControlState, set_kill, set_pace


def switch(scope: str, key: str = "*", tripped: bool = True) -> KillSwitch:
    return KillSwitch(scope=scope, key=key, tripped=tripped, reason="test", by="test", time_ms=now_ms())


async def test_state_reads_existing_switches_then_follows_changes(nc, settings):
    js = nc.jetstream()
    subjects = settings.subjects
    await ensure_streams(js, subjects)
    await set_kill(js, subjects, switch("tenant", "acme"))

    state = await ControlState.open(js, subjects)
    try:
        assert state.blocked(tenant="acme", task_id="t1", model="m").scope == "tenant"
        assert state.blocked(tenant="other", task_id="t1", model="m") is None

        tripped = asyncio.Event()
        state.on_trip(lambda s: tripped.set() if s.scope == "model" else None)
        await set_kill(js, subjects, switch("model", "gpt-4-1106-preview"))
        await asyncio.wait_for(tripped.wait(), 2)
        assert state.blocked(tenant="other", task_id="t1", model="gpt-4-1106-preview").scope == "model"

        await set_kill(js, subjects, switch("tenant", "acme", tripped=False))
        await set_pace(js, subjects, PaceSignal(tenant="acme", action="downgrade", spend_usd=2, curve_usd=1, time_ms=now_ms()))
        for _ in range(100):
            if state.pace("acme") and state.blocked(tenant="acme", task_id="t1", model="m") is None:
                break
            await asyncio.sleep(0.01)
        assert state.blocked(tenant="acme", task_id="t1", model="m") is None
        assert state.pace("acme").action == "downgrade"
    finally:
        await state.close()
