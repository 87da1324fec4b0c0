"""The control plane: a switch set before a service starts is seen at start; later ones arrive pushed."""

import asyncio

import pytest
from helpers import eventually, kill_switch, pace_signal

from services.runtime.control import ControlState, covers, set_kill, set_pace
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


async def test_a_key_switch_blocks_that_key_alone(bus):
    await ensure_streams(bus.jetstream, bus.subjects)
    await set_kill(bus, kill_switch("key", "fmk_a"))

    state = await ControlState.open(bus)
    try:
        switch = state.blocked(tenant="acme", task_id="t1", model="m", key_id="fmk_a")
        assert (switch.scope, switch.key) == ("key", "fmk_a")
        assert covers(switch, tenant="acme", task_id="t1", model="m", key_id="fmk_a")
        # Another key of the same tenant, and a call without a key (the default), are not blocked.
        assert state.blocked(tenant="acme", task_id="t1", model="m", key_id="fmk_b") is None
        assert state.blocked(tenant="acme", task_id="t1", model="m") is None
        assert not covers(switch, tenant="acme", task_id="t1", model="m", key_id="fmk_b")
        assert not covers(switch, tenant="acme", task_id="t1", model="m")
        # A wider switch still wins over a key's: the tenant's stops every key of the tenant.
        await set_kill(bus, kill_switch("tenant", "acme"))
        await eventually(lambda: state.blocked(tenant="acme", task_id="t1", model="m", key_id="fmk_b"), timeout_s=2)
        assert state.blocked(tenant="acme", task_id="t1", model="m", key_id="fmk_a").scope == "tenant"
    finally:
        await state.close()
