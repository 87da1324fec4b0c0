"""Budget caps: from deploy/budgets.toml, overridden at run time through the KV bucket ``<prefix>_budgets``.

A scope is global, one tenant, one model or one virtual key (a gateway credential, ``fmk_...``,
which belongs to one tenant: a call made with it counts against both caps); each has an optional
day cap and month cap (UTC calendar day and month). A task's cap is not configured here: it travels on each Reservation
(``task_budget_usd``, the Task's ``budget_usd``). ``frugalmesh budget set`` sends a
BudgetUpdate to the accountant, which writes the new caps of that scope to KV before it uses
them, so they survive a restart and win over the file from then on. A stored value that is not a
valid BudgetCap is dead-lettered with the reason and skipped (the scope keeps the file's caps), so
it cannot stop the accountant from starting.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from schemas.messages import BudgetCap, BudgetScope, BudgetUpdate
from schemas.subjects import BUCKET_BUDGETS, token
from services.accountant.ledger import dollars, pico
from services.runtime.dead_letters import entry_subject
from services.runtime.kv_snapshot import current_entries

if TYPE_CHECKING:
    from services.runtime.bus import Bus

BUDGETS_FILE = "budgets.toml"
SCOPES = ("global", "tenant", "model", "key")
# The file's table of each keyed scope: [tenants.<tenant>], [models.<model>], [keys.<key id>].
FILE_TABLES = {"tenant": "tenants", "model": "models", "key": "keys"}


@dataclass(frozen=True)
class Caps:
    """A scope's caps in picodollars; None: no cap."""

    day: int | None = None
    month: int | None = None

    def window(self, window: str) -> int | None:
        return self.day if window == "day" else self.month if window == "month" else None


@dataclass(frozen=True)
class PacingConfig:
    """Layer 5: how far ahead of its month curve a tenant may run (fractions of its month cap)."""

    interval_s: float = 1.0
    downgrade_ahead: float = 0.05
    throttle_ahead: float = 0.20


@dataclass
class BudgetConfig:
    caps: dict[tuple[str, str], Caps] = field(default_factory=dict)
    pacing: PacingConfig = field(default_factory=PacingConfig)

    @classmethod
    def load(cls, path: Path) -> BudgetConfig:
        """Read ``path``; a missing file means no caps and default pacing."""
        if not path.is_file():
            return cls()
        raw = tomllib.loads(path.read_text())
        # A misspelt table (``[key.fmk_x]`` for ``[keys.fmk_x]``) would leave its scope uncapped in silence.
        unknown = set(raw) - {"global", "pacing", *FILE_TABLES.values()}
        if unknown:
            expected = "global, tenants, models, keys, pacing"
            raise ValueError(f"{path}: unknown tables {sorted(unknown)}; expected {expected}")
        config = cls(pacing=PacingConfig(**raw.get("pacing", {})))
        if "global" in raw:
            config.caps[("global", "*")] = _caps(raw["global"], f"{path}: [global]")
        for scope, table in FILE_TABLES.items():
            for key, spec in raw.get(table, {}).items():
                token(key)
                config.caps[(scope, key)] = _caps(spec, f"{path}: [{table}.{key}]")
        return config


def _caps(spec: dict, where: str) -> Caps:
    unknown = set(spec) - {"day_usd", "month_usd"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected day_usd, month_usd")
    return Caps(*(_amount(spec.get(name), where) for name in ("day_usd", "month_usd")))


def _amount(value: float | None, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: a cap must be a non-negative number of USD, not {value!r}")
    return pico(float(value))


def check_scope(scope: str, key: str) -> str:
    """The canonical key of a scope (``*`` for global); raise ValueError for an unusable one."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope == "global":
        return "*"
    if not key or key == "*":
        name = "virtual key's id" if scope == "key" else f"{scope} name"
        raise ValueError(f"a {scope} budget needs a key (the {name})")
    return token(key)


def kv_key(scope: str, key: str) -> str:
    return "global" if scope == "global" else f"{scope}.{key}"


def to_message(scope: str, key: str, caps: Caps) -> BudgetCap:
    """The wire form of a scope's caps (``scope`` was checked against BudgetScope when the caps were read)."""
    return BudgetCap(
        scope=cast(BudgetScope, scope),
        key=key,
        day_usd=None if caps.day is None else dollars(caps.day),
        month_usd=None if caps.month is None else dollars(caps.month),
    )


class BudgetBook:
    """The caps in force: the file's, with every run-time change on top."""

    def __init__(self, config: BudgetConfig) -> None:
        self.caps: dict[tuple[str, str], Caps] = dict(config.caps)
        self._kv: KeyValue | None = None

    async def open(self, bus: Bus) -> None:
        """Bind the KV bucket and apply the run-time changes stored in it."""
        # History 16: a scope's last changes stay readable with `nats kv history`.
        self._kv = await bus.key_value(bus.subjects.bucket(BUCKET_BUDGETS), history=16)
        watcher = await self._kv.watchall()
        async for entry in current_entries(bus, bus.subjects.bucket(BUCKET_BUDGETS), watcher, timeout_s=10):
            if entry.operation in (KV_DEL, KV_PURGE):
                continue
            try:
                stored = msgspec.json.decode(entry.value or b"", type=BudgetCap)
                own_key = kv_key(stored.scope, stored.key)
                if own_key != entry.key:  # a write under one key never sets another scope's caps
                    raise ValueError(f"the caps are for {own_key!r}, stored under {entry.key!r}")
                caps = Caps(_amount(stored.day_usd, entry.key), _amount(stored.month_usd, entry.key))
            except (ValueError, RecursionError) as exc:  # msgspec's DecodeError is a ValueError too
                error = f"budget value {entry.key}: {exc}"
                await bus.dead_letter(entry_subject(entry), entry.value or b"", None, error)
                continue
            self.caps[(stored.scope, stored.key)] = caps
        await watcher.stop()

    def cap(self, scope: str, key: str, window: str) -> int | None:
        caps = self.caps.get((scope, key))
        return None if caps is None else caps.window(window)

    async def update(self, update: BudgetUpdate) -> BudgetCap:
        """Apply ``update`` (stored in KV first, so a change that was acknowledged is never lost)."""
        assert self._kv is not None, "BudgetBook.open() first"
        key = check_scope(update.scope, update.key)
        current = self.caps.get((update.scope, key), Caps())
        day = (
            None
            if "day" in update.unset
            else _amount(update.day_usd, "day_usd")
            if update.day_usd is not None
            else current.day
        )
        month = (
            None
            if "month" in update.unset
            else _amount(update.month_usd, "month_usd")
            if update.month_usd is not None
            else current.month
        )
        caps = Caps(day, month)
        message = to_message(update.scope, key, caps)
        await self._kv.put(kv_key(update.scope, key), msgspec.json.encode(message))
        self.caps[(update.scope, key)] = caps
        return message

    def all(self) -> list[BudgetCap]:
        return [to_message(scope, key, caps) for (scope, key), caps in sorted(self.caps.items())]
