"""The control plane every service obeys: the kill switch and the pace signal.

The last value of each switch lives in the KV bucket ``<prefix>_control`` (keys
``kill.global``, ``kill.<scope>.<key>`` for scopes tenant, task, model and key (a virtual key's
id), ``pace.<tenant>``); every change is also published on
``mesh.control.kill`` / ``mesh.control.pace`` (JetStream) as the event of record, which the
accountant stores in ClickHouse. Writers put the KV value first, so a trip takes effect even
when the accountant is down. Services hold a ``ControlState``: it reads every current value
before the service takes work (a restarted service sees a switch tripped while it was away),
then follows changes through a KV watch, which pushes them within milliseconds.

A value that is not a valid switch or signal (anyone who can write the bucket can write garbage)
is dead-lettered with the reason and skipped, at start as in the watch: it never stops a service
from starting, and the watch goes on, so a later valid trip still takes effect. Garbage written over
a tripped switch leaves it tripped. So is a value that names another switch or tenant than the key it
is stored under (a tenant's switch under ``kill.global``, or tenant B's pace under ``pace.A``): what
a key holds is what the key says, and a reader never lets one key's write change another's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from schemas.messages import KillSwitch, PaceSignal
from schemas.subjects import (
    BUCKET_CONTROL,
    CONTROL_KILL_KEYS,
    CONTROL_PACE_KEYS,
    STREAM_CONTROL,
    control_kill_key,
    control_pace_key,
)
from services.runtime.bus import Bus
from services.runtime.dead_letters import UNREADABLE, entry_subject
from services.runtime.kv_snapshot import current_entries


async def control_bucket(bus: Bus) -> KeyValue:
    # History 16: the last changes of a switch stay readable with `nats kv history` when debugging.
    return await bus.key_value(bus.subjects.bucket(BUCKET_CONTROL), history=16)


async def set_kill(bus: Bus, switch: KillSwitch) -> None:
    """Trip (``tripped=True``) or clear a switch: KV first (what services obey), then the event."""
    await write_kill(bus, switch)
    await bus.publish(bus.subjects.control_kill, switch, stream=bus.subjects.stream(STREAM_CONTROL))


async def write_kill(bus: Bus, switch: KillSwitch) -> None:
    """The switch's value in KV, what every service obeys (``set_kill`` also publishes the event)."""
    kv = await control_bucket(bus)
    await kv.put(control_kill_key(switch.scope, switch.key), msgspec.json.encode(switch))


async def set_pace(bus: Bus, signal: PaceSignal) -> None:
    kv = await control_bucket(bus)
    await kv.put(control_pace_key(signal.tenant), msgspec.json.encode(signal))
    await bus.publish(bus.subjects.control_pace, signal, stream=bus.subjects.stream(STREAM_CONTROL))


def killed_message(switch: KillSwitch) -> str:
    """What a call stopped by ``switch`` reports: which switch, and the reason it was tripped."""
    return f"kill switch tripped ({switch.scope} {switch.key}): {switch.reason}"


def task_switch_key(tenant: str, task_id: str) -> str:
    """A task switch's key: ``<tenant>.<task id>``, since task ids are unique only within a tenant."""
    return f"{tenant}.{task_id}"


def covers(switch: KillSwitch, *, tenant: str, task_id: str, model: str, key_id: str = "") -> bool:
    """Whether ``switch`` applies to a call of this tenant, task, model and virtual key ("": none)."""
    return (
        switch.scope == "global"
        or (switch.scope == "tenant" and switch.key == tenant)
        or (switch.scope == "task" and switch.key == task_switch_key(tenant, task_id))
        or (switch.scope == "model" and switch.key == model)
        or (switch.scope == "key" and bool(key_id) and switch.key == key_id)
    )


class ControlState:
    """The current kill switches and pace signals, kept up to date by a KV watch."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.kills: dict[str, KillSwitch] = {}
        self.paces: dict[str, PaceSignal] = {}
        self._listeners: list[Callable[[KillSwitch], None]] = []
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follow: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, bus: Bus) -> ControlState:
        """Read every current value, then follow changes in the background."""
        state = cls(bus)
        kv = await control_bucket(bus)
        watcher = state._watcher = await kv.watchall()
        async for entry in current_entries(bus, bus.subjects.bucket(BUCKET_CONTROL), watcher, timeout_s=10):
            await state._take(entry)
        state._follow = asyncio.create_task(state._follow_updates(watcher))
        return state

    async def _follow_updates(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                await self._take(entry)

    async def _take(self, entry: KeyValue.Entry) -> None:
        """Apply one entry; whatever is wrong with it ends here, never the watch."""
        try:
            self._apply(entry)
        except UNREADABLE as exc:
            error = f"control value {entry.key}: {exc}"
            await self.bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)
        except Exception:
            # A listener that failed (cancelling calls in flight) must not stop later switches either.
            self.bus.log.exception("control_entry_failed", key=entry.key)

    def _apply(self, entry: KeyValue.Entry) -> None:
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        if entry.key.startswith(CONTROL_KILL_KEYS):
            if deleted:
                self.kills.pop(entry.key, None)
                return
            switch = msgspec.json.decode(entry.value or b"", type=KillSwitch)
            _check_stored_under(control_kill_key(switch.scope, switch.key), entry.key)
            if switch.tripped:
                self.kills[entry.key] = switch
                for listener in self._listeners:
                    listener(switch)
            else:
                self.kills.pop(entry.key, None)
        elif entry.key.startswith(CONTROL_PACE_KEYS):
            if deleted:
                self.paces.pop(entry.key.removeprefix(CONTROL_PACE_KEYS), None)
            else:
                signal = msgspec.json.decode(entry.value or b"", type=PaceSignal)
                _check_stored_under(control_pace_key(signal.tenant), entry.key)
                self.paces[signal.tenant] = signal

    def blocked(self, *, tenant: str, task_id: str, model: str, key_id: str = "") -> KillSwitch | None:
        """The tripped switch that forbids a paid call of this tenant, task, model and virtual key, if any.

        ``key_id`` "" (the default: a call that did not come through the gateway) checks no key switch.
        Asked before every paid call, so nothing tripped (the usual case) costs one emptiness check.
        """
        if not self.kills:
            return None
        for key in (
            control_kill_key("global", ""),
            control_kill_key("tenant", tenant),
            control_kill_key("task", task_switch_key(tenant, task_id)),
            control_kill_key("model", model),
        ):
            if key in self.kills:
                return self.kills[key]
        if key_id:
            return self.kills.get(control_kill_key("key", key_id))
        return None

    def pace(self, tenant: str) -> PaceSignal | None:
        return self.paces.get(tenant)

    def on_trip(self, listener: Callable[[KillSwitch], None]) -> None:
        """Call ``listener`` with every switch tripped from now on (to cancel in-flight work)."""
        self._listeners.append(listener)

    async def close(self) -> None:
        if self._follow:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._watcher:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]


def _check_stored_under(own_key: str, key: str) -> None:
    """Refuse a value whose own key (what it names) is not the key it is stored under."""
    if own_key != key:
        raise msgspec.ValidationError(f"the value is for {own_key!r}, stored under {key!r}")
