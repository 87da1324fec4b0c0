"""Layer 2 (anti-loop) for the tasks whose calls no workflow bounds, as configured in deploy/planner.toml.

Two kinds of caller make calls that no workflow step bounds: a gateway task (the requests that
share an ``X-Frugalmesh-Task`` header, an OpenAI-style agent's own loop) and an agent service's
calls within a planner task (StepRequest.agent set: the agent decides how many calls it makes).
Their limits, read from the one file that holds layer 2:

- ``[limits] identical_calls``: the same call at most this many times in one task. The planner's
  number, reused rather than repeated: the rule is the mesh's, whichever door a call came in by,
  so one setting tightens it everywhere;
- ``[gateway] max_calls_per_task``: all calls of one gateway task. A planner task's calls are
  bounded by its workflow (steps, fan-out, ``max_loops``); an agent's are not, so a loop that varies
  its prompt each turn is stopped here. ``task_ttl_s``: how long a task's counts live after its last
  counted call; a loop that runs into the cap gets that many calls again only after so long idle.
  The counts of agents' calls live in the same KV bucket, so this TTL is theirs too;
- ``[agents] max_calls_per_task``: all calls the agent services make in one task, together.

This sits below the services because the planner must accept the ``[gateway]`` and ``[agents]``
tables (services/planner/config.py checks the whole file) and the gateway and the router must read
them, and sibling services do not import each other.
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


def check_max_calls(table: str, max_calls_per_task: int) -> None:
    if not 1 <= max_calls_per_task <= MOST_CALLS_PER_TASK:
        raise ValueError(f"{table}.max_calls_per_task must be 1 to {MOST_CALLS_PER_TASK}, not {max_calls_per_task}")


class GatewayLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[gateway]`` table of planner.toml: what only a gateway task needs, and the counts' TTL."""

    max_calls_per_task: int = 200
    task_ttl_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        # Built in code by tests too, where msgspec checks nothing.
        check_max_calls("gateway", self.max_calls_per_task)
        if self.task_ttl_s <= 0:
            raise ValueError(f"gateway.task_ttl_s must be above 0, not {self.task_ttl_s}")


class AgentLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[agents]`` table of planner.toml: the agent services' calls in one task."""

    max_calls_per_task: int = 100

    def __post_init__(self) -> None:
        check_max_calls("agents", self.max_calls_per_task)


class TaskLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway and the router enforce per task: ``[limits] identical_calls``, the ``[gateway]``
    and the ``[agents]`` tables."""

    identical_calls: int = DEFAULT_IDENTICAL_CALLS
    gateway: GatewayLimits = GatewayLimits()
    agents: AgentLimits = AgentLimits()

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
                agents=msgspec.convert(raw.get("agents", {}), AgentLimits),
            )
        except FileNotFoundError:
            raise ValueError(
                f"no planner configuration at {path}; copy deploy/{PLANNER_FILE} from the repository"
            ) from None
        except (tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
