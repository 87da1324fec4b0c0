"""The control plane: a switch set before a service starts is seen at start; later ones arrive pushed."""

import asyncio

import pytest
from helpers import eventually, kill_switch, pace_signal

from services.runtime.control import ControlState, set_kill, set_pace
from services.runtime.streams import ensure_streams

pytestmark = pytest.mark.infra


async def test_state_reads_existing_switches_then_follows_changes(bus):
    await ensure_streams(bus.jetstream, bus.subjects)
    await set_kill(bus, kill_switch("tenant", "acme"))

    state = await ControlState.open(bus)
    try:
        assert state.blocked(tenant="acme", task_id="t1", model="m").scope == "tenant"
        assert state.blocked(tenant="other", task_id="t1", model="m") is None

        tripped = asyncio.Event()
        state.on_trip(lambda s: tripped.set() if s.scope == "model" else None)
        await set_kill(bus, kill_switch("model", "gpt-4-1106-preview"))
        await asyncio.wait_for(tripped.wait(), 2)
        assert state.blocked(tenant="other", task_id="t1", model="gpt-4-1106-preview").scope == "model"

        await set_kill(bus, kill_switch("tenant", "acme", tripped=False))
        await set_pace(bus, pace_signal("acme", "downgrade"))
        await eventually(
            lambda: state.pace("acme") and state.blocked(tenant="acme", task_id="t1", model="m") is None, timeout_s=2
        )
        assert state.pace("acme").action == "downgrade"
    finally:
        await state.close()
