"""Routing policies: how the router picks the model of a step, chosen per tenant or workflow.

- ``rules``: the routing table (services.routing.table.RoutingTable) by workflow, role, prompt size.
- ``fixed:<model>``: one pinned model.
- ``learned``: a prompt model predicts whether the weak model will be right (learned.py).
- ``cascade``: the weak model first, the strong one when a validator rejects its answer (cascade.py).
- ``online``: per tag (the step's workflow), what the mesh learned from labelled traffic, with shadow
  calls to learn more (online.py, tags.py); one instance per router, so every tenant and workflow
  naming it shares its evidence.

``execute`` is the one place a policy turns into calls: the router service runs it with calls
on the bus, ``frugalmesh eval routing`` with recorded answers, so what is evaluated is what runs.
A step may name its policy (``StepRequest.policy``: the gateway sends a virtual key's
``--policy`` for its ``frugalmesh/auto`` calls); that wins over the tenant's and the workflow's.
An unknown name is ``UnknownPolicy``, and the router refuses the step. Selection lives in
deploy/routing.toml::

    [policies]
    default = "rules"
    router = "routers/mixtral-gpt4.npz"   # the trained router file of learned and cascade
    tenants = { acme = "learned" }        # a tenant's policy wins over its workflow's
    workflows = { answer = "cascade" }
    online = { shadow_share = 0.1 }       # optional: OnlineSettings of the online policy
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
from services.routing.policies.online import ONLINE, OnlinePolicy, OnlineSettings
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
KNOWN = "rules, fixed:<model>, learned, cascade, online"


class UnknownPolicy(ValueError):
    """A policy name the router cannot build: not a policy, a model outside the catalogue, or learned
    and cascade without a router file."""


class PolicyBuilder:
    """Builds each named policy once, on first use, so each router file is read and held once.
    Learned and cascade read the router file named by ``[policies] router``; the rules are ``table``."""

    def __init__(
        self,
        table: RoutingTable,
        catalog: Catalog,
        deploy_dir: Path,
        router: str | None,
        source: str,
        online: OnlineSettings | None = None,
    ) -> None:
        self.table = table
        self.catalog = catalog
        self.deploy_dir = deploy_dir
        self.router = router
        self.source = source
        self.online = online or OnlineSettings()
        self.built: dict[str, Policy] = {}
        self.loaded_file: RouterFile | None = None

    def get(self, name: str, where: str) -> Policy:
        """The policy ``name`` (``where`` says who named it, for the error); UnknownPolicy when there is none."""
        policy = self.built.get(name)
        if policy is None:
            # Only a name that builds is kept: a step naming nonsense cannot grow the cache.
            policy = self.built[name] = self._build(name, where)
        return policy

    def _build(self, name: str, where: str) -> Policy:
        if name == RULES:
            return self.table
        if name.startswith(FIXED_PREFIX):
            model = name.removeprefix(FIXED_PREFIX)
            if model not in self.catalog.models:
                raise UnknownPolicy(f"{self.source}: {where}: policy {name!r} names a model outside the catalogue")
            return FixedPolicy(model)
        if name not in (LEARNED, CASCADE, ONLINE):
            raise UnknownPolicy(f"{self.source}: {where}: unknown policy {name!r}; known: {KNOWN}")
        if self.router is None:
            raise UnknownPolicy(f"{self.source}: {where}: policy {name} needs [policies] router = <router file>")
        if self.loaded_file is None:
            try:
                router_file = RouterFile.load(self.deploy_dir / self.router)
                for model in (router_file.weak_model, router_file.strong_model):
                    self.catalog.model(model)
            except (OSError, KeyError, ValueError) as exc:
                message = f"{self.source}: {where}: policy {name}: router file {self.router}: {exc}"
                raise UnknownPolicy(message) from None
            self.loaded_file = router_file
        try:
            if name == LEARNED:
                return LearnedPolicy.from_file(self.loaded_file)
            if name == ONLINE:
                return OnlinePolicy.from_file(self.loaded_file, self.online)
            return CascadePolicy.from_file(self.loaded_file)
        except ValueError as exc:
            raise UnknownPolicy(f"{self.source}: {where}: policy {name}: router file {self.router}: {exc}") from None


@dataclass(frozen=True)
class PolicySet:
    """Which policy routes a step: the step's own (``StepRequest.policy``: a virtual key's), else its
    tenant's, else its workflow's, else the default."""

    default: Policy
    tenants: Mapping[str, Policy]
    workflows: Mapping[str, Policy]
    # Builds the policies steps name; None (a set built in code): a step that names one is refused.
    named: PolicyBuilder | None = None

    def for_step(self, step: StepRequest) -> Policy:
        """The step's policy; UnknownPolicy when the step names one this router cannot build."""
        if step.policy:
            if self.named is None:
                raise UnknownPolicy(f"this router takes no per-step policy, and the step names {step.policy!r}")
            return self.named.get(step.policy, "the step's policy")
        return self.tenants.get(step.tenant) or self.workflows.get(step.workflow) or self.default

    @property
    def router_file(self) -> Path | None:
        """The router file this set's learned policies were read from (watched for new versions)."""
        if self.named is None or self.named.router is None:
            return None
        return self.named.deploy_dir / self.named.router

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
        unknown = set(spec) - {"default", "router", "tenants", "workflows", ONLINE}
        if unknown:
            raise ValueError(f"{source}: [policies]: unknown keys {sorted(unknown)}")
        try:
            online = OnlineSettings(**spec.get(ONLINE, {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: [policies] online: {exc}") from None
        builder = PolicyBuilder(table, catalog, deploy_dir, spec.get("router"), source, online)
        return cls(
            default=builder.get(spec.get("default", RULES), "default"),
            tenants={k: builder.get(v, f"tenants.{k}") for k, v in spec.get("tenants", {}).items()},
            workflows={k: builder.get(v, f"workflows.{k}") for k, v in spec.get("workflows", {}).items()},
            named=builder,
        )
