"""Layer 2 (anti-loop) for the gateway's tasks, as configured in deploy/planner.toml.

A gateway task is the requests that share an ``X-Frugalmesh-Task`` header: an agent's own loop
rather than a workflow whose steps bound its calls. Two limits apply to it, read from the one file
that holds layer 2:

- ``[limits] identical_calls``: the same call at most this many times in one task. The planner's
  number, reused rather than repeated: the rule is the mesh's, whichever door a task came in by,
  so one setting tightens it everywhere;
- ``[gateway] max_calls_per_task``: all calls of one task. A planner task's calls are bounded by
  its workflow (steps, fan-out, ``max_loops``); an agent's are not, so a loop that varies its
  prompt each turn is stopped here. ``task_ttl_s``: how long a task's counts live after its last
  counted call; a loop that runs into the cap gets that many calls again only after so long idle.

This sits below both services because the planner must accept the ``[gateway]`` table
(services/planner/config.py checks the whole file) and the gateway must read it, and sibling
services do not import each other.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

PLANNER_FILE = "planner.toml"
# The planner's own default (services/planner/config.py Limits), for a file without [limits].
DEFAULT_IDENTICAL_CALLS = 2
# A task's counts are one KV value holding one entry per distinct call, moved by compare-and-set on
# every call: bounded so that value stays small (about 25 bytes per call).
MOST_CALLS_PER_TASK = 5_000


class GatewayLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[gateway]`` table of planner.toml: what only a gateway task needs."""

    max_calls_per_task: int = 200
    task_ttl_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        # Built in code by tests too, where msgspec checks nothing.
        if not 1 <= self.max_calls_per_task <= MOST_CALLS_PER_TASK:
            raise ValueError(
                f"gateway.max_calls_per_task must be 1 to {MOST_CALLS_PER_TASK}, not {self.max_calls_per_task}"
            )
        if self.task_ttl_s <= 0:
            raise ValueError(f"gateway.task_ttl_s must be above 0, not {self.task_ttl_s}")


class TaskLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway enforces per task: ``[limits] identical_calls`` and the ``[gateway]`` table."""

    identical_calls: int = DEFAULT_IDENTICAL_CALLS
    gateway: GatewayLimits = GatewayLimits()

    def __post_init__(self) -> None:
        if self.identical_calls < 1:
            raise ValueError(f"limits.identical_calls must be at least 1, not {self.identical_calls}")

    @classmethod
    def load(cls, deploy_dir: Path) -> TaskLimits:
        """``deploy_dir``'s planner.toml; ValueError naming the file when it is missing or invalid."""
        path = deploy_dir / PLANNER_FILE
        try:
            raw = tomllib.loads(path.read_text())
            identical = raw.get("limits", {}).get("identical_calls", DEFAULT_IDENTICAL_CALLS)
            return cls(
                identical_calls=msgspec.convert(identical, int),
                gateway=msgspec.convert(raw.get("gateway", {}), GatewayLimits),
            )
        except FileNotFoundError:
            raise ValueError(
                f"no planner configuration at {path}; copy deploy/{PLANNER_FILE} from the repository"
            ) from None
        except (tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
