"""The planner's configuration file, ``deploy/planner.toml``: layer-2 limits and estimate profiles."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from services.runtime.task_limits import AgentLimits, GatewayLimits

PLANNER_FILE = "planner.toml"


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Layer 2, anti-loop: how often a task, a step and a call may repeat."""

    attempts_per_day: int = 3
    step_attempts: int = 2
    identical_calls: int = 2
    max_loops: int = 5

    def __post_init__(self) -> None:
        # Built in code by tests and options too, where msgspec checks nothing.
        for name in self.__struct_fields__:
            minimum = 0 if name == "max_loops" else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"limits.{name} must be at least {minimum}, not {getattr(self, name)}")


class ModelProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the estimate assumes of one model: its typical latency per call and its success rate."""

    latency_s: float
    # None: the model's recorded accuracy (services.planner.preflight).
    p_success: float | None = None


class PlannerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole of planner.toml: checked on load, so a typo stops the planner at start."""

    limits: Limits = Limits()
    models: dict[str, ModelProfile] = {}
    # Not the planner's: the gateway's tasks and the agents' calls, enforced by the gateway and the router
    # (services/runtime/task_limits.py), checked here with the rest.
    gateway: GatewayLimits = GatewayLimits()
    agents: AgentLimits = AgentLimits()

    @classmethod
    def load(cls, deploy_dir: Path) -> PlannerConfig:
        """``deploy_dir``'s planner.toml; ValueError naming the file when it is missing or invalid."""
        path = deploy_dir / PLANNER_FILE
        try:
            return msgspec.convert(tomllib.loads(path.read_text()), type=cls)
        except FileNotFoundError:
            raise ValueError(
                f"no planner configuration at {path}; copy deploy/{PLANNER_FILE} from the repository"
            ) from None
        except (tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
