"""Routing policies: how the router picks the model of a step, chosen per tenant or workflow.

- ``rules``: the routing table (services.routing.table.RoutingTable) by workflow, role, prompt size.
- ``fixed:<model>``: one pinned model.
- ``learned``: a prompt model predicts whether the weak model will be right (learned.py).
- ``cascade``: the weak model first, the strong one when a validator rejects its answer (cascade.py).

``execute`` is the one place a policy turns into calls: the router service runs it with calls
on the bus, ``frugalmesh eval routing`` with recorded answers, so what is evaluated is what runs.
Selection lives in deploy/routing.toml::

    [policies]
    default = "rules"
    router = "routers/mixtral-gpt4.npz"   # the trained router file of learned and cascade
    tenants = { acme = "learned" }        # a tenant's policy wins over its workflow's
    workflows = { answer = "cascade" }
"""

from __future__ import annotations

import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from schemas.messages import InferenceResult, StepRequest
from services.routing.policies.cascade import CascadePolicy
from services.routing.policies.fixed import FixedPolicy
from services.routing.policies.learned import LearnedPolicy
from services.routing.policies.routerfile import RouterFile
from services.routing.table import ROUTING_FILE, RoutingTable
from services.runtime.catalog import Catalog, ModelSpec


class Policy(Protocol):
    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        """The model the step's (first) call runs on; PinningError when its allow-list permits none."""


Call = Callable[[ModelSpec], Awaitable[InferenceResult]]


async def execute(
    policy: Policy, step: StepRequest, catalog: Catalog, call: Call, *, downgrade: bool = False
) -> InferenceResult:
    """Run ``step`` under ``policy``: one call, or for a cascade whose validator rejects the weak
    answer, a second call on the strong model. A failed first call is returned as it is: escalating
    past a kill switch, a refusal or an outage would spend where the mesh said not to."""
    model = policy.choose(step, catalog, downgrade=downgrade)
    first = await call(model)
    if not isinstance(policy, CascadePolicy) or first.error is not None or policy.accepts(first):
        return first
    strong = policy.escalation(step, catalog, downgrade=downgrade)
    if strong.name == model.name:
        return first
    second = await call(strong)
    # Each call was metered on its own; the reply carries what the step cost in all.
    return msgspec.structs.replace(second, cost_usd=first.cost_usd + second.cost_usd)


RULES = "rules"
LEARNED = "learned"
CASCADE = "cascade"
FIXED_PREFIX = "fixed:"


@dataclass(frozen=True)
class PolicySet:
    default: Policy
    tenants: Mapping[str, Policy]
    workflows: Mapping[str, Policy]

    def for_step(self, step: StepRequest) -> Policy:
        return self.tenants.get(step.tenant) or self.workflows.get(step.workflow) or self.default

    @classmethod
    def load(cls, deploy_dir: Path, table: RoutingTable, catalog: Catalog) -> PolicySet:
        path = deploy_dir / ROUTING_FILE
        return cls.parse(tomllib.loads(path.read_text()), table, catalog, deploy_dir, str(path))

    @classmethod
    def parse(
        cls, raw: dict[str, Any], table: RoutingTable, catalog: Catalog, deploy_dir: Path, source: str = "routing.toml"
    ) -> PolicySet:
        """The ``[policies]`` table of routing.toml; without one, the rules route everything.
        The router file is read only when a learned or cascade policy is selected."""
        spec = dict(raw.get("policies", {}))
        unknown = set(spec) - {"default", "router", "tenants", "workflows"}
        if unknown:
            raise ValueError(f"{source}: [policies]: unknown keys {sorted(unknown)}")
        router_file: RouterFile | None = None

        def build(name: str, where: str) -> Policy:
            nonlocal router_file
            if name == RULES:
                return table
            if name.startswith(FIXED_PREFIX):
                model = name.removeprefix(FIXED_PREFIX)
                catalog.model(model)
                return FixedPolicy(model)
            if name not in (LEARNED, CASCADE):
                raise ValueError(
                    f"{source}: {where}: unknown policy {name!r}; known: rules, fixed:<model>, learned, cascade"
                )
            if "router" not in spec:
                raise ValueError(f"{source}: {where}: policy {name} needs [policies] router = <router file>")
            if router_file is None:
                router_file = RouterFile.load(deploy_dir / spec["router"])
                for model in (router_file.weak_model, router_file.strong_model):
                    catalog.model(model)
            return LearnedPolicy.from_file(router_file) if name == LEARNED else CascadePolicy.from_file(router_file)

        built: dict[str, Policy] = {}

        def policy(name: str, where: str) -> Policy:
            # One object per named policy, so each router file is read and held once.
            if name not in built:
                built[name] = build(name, where)
            return built[name]

        return cls(
            default=policy(spec.get("default", RULES), "default"),
            tenants={k: policy(v, f"tenants.{k}") for k, v in spec.get("tenants", {}).items()},
            workflows={k: policy(v, f"workflows.{k}") for k, v in spec.get("workflows", {}).items()},
        )
