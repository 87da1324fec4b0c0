"""The ``online`` policy: routes each tag's calls by what the mesh has learned about that tag.

Each call carries a tag (``step_tag``: its workflow). The policy keeps, per tag, paired labels
(tags.py: both models' answers judged on the same call) from the router file (training data,
or the labels `frugalmesh router train --from-clickhouse` read) and from shadow calls it asks
for, and plans each tag's weak share (``tags.plan_weak_shares``). A call goes weak when a
uniform number drawn from its prompt's hash is below its tag's share: within a tag the choice is
random, so the calls that go strong are a fair sample of the tag, and shadowing them with the
cheap weak model yields unbiased labels for the cost of a weak call.

Shadowing (``shadow_model``): a call routed strong is also answered by the weak model when its
tag has fewer than ``labels_wanted`` labels and the shadowed share of calls stays within
``shadow_share`` (or the step's tenant's or workflow's own share, ``OnlineSettings.tenants`` and
``workflows``, each counted over its own calls). Only strong calls are shadowed: a weak shadow
costs about 1/300 of a GPT-4 call, and a call kept off GPT-4 stays off it (also shadowing weak
calls with GPT-4, in tags routed wholly weak, kept 2 points more calls weak on the tuning domains
but made 3.5-12.8% of the spend: docs/routing.md). A tag routed wholly weak gets no more labels;
its cautious gap put it there. The judge of a pair is the
caller's business (a validator, a judge model, recorded labels in a replay); ``learn`` takes its
verdict, and ``retrain`` (every ``retrain_every`` calls in a replay; on a schedule live) turns
the labels gathered into a new plan.

A tag never seen has the prior's posterior: its share is random routing calibrated to the
target on the training data (the fallback for weak evidence). Deliberately not done: choosing
within a tag by the prompt model's score (it would bias which calls get shadowed, and the
embedding carries little signal on domains it never saw: docs/routing.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import StepRequest
from services.routing.policies.learned import prompt_uniform, step_prompt
from services.routing.policies.routerfile import AnswerModel, RouterFile
from services.routing.policies.tags import TagPosterior, TagPrior, outcome_index, plan_weak_shares
from services.routing.table import resolve_model
from services.runtime.catalog import Catalog, ModelSpec

ONLINE = "online"


def step_tag(step: StepRequest) -> str:
    """What a call says it is: its workflow (a replay sets it to the CSV file's name)."""
    return step.workflow


@dataclass(frozen=True)
class OnlineSettings:
    target: float = 0.95
    # Most calls shadowed, as a share of calls routed so far.
    shadow_share: float = 0.1
    # Shadow shares of their own for some tenants (first) or workflows; each is its own budget of
    # shadow calls (a share of that tenant's or workflow's calls).
    tenants: dict[str, float] = field(default_factory=dict)
    workflows: dict[str, float] = field(default_factory=dict)
    # Paired labels per tag after which its calls are no longer shadowed.
    labels_wanted: int = 60
    # How many posterior standard deviations a tag's gap is taken pessimistically.
    caution: float = 0.5
    # Calls between two plans.
    retrain_every: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1.5:
            raise ValueError(f"target is a share of the strong model's accuracy, e.g. 0.95, not {self.target}")
        for share in (self.shadow_share, *self.tenants.values(), *self.workflows.values()):
            if not 0 <= share <= 1:
                raise ValueError(f"shadow_share is a share of calls, 0 to 1, not {share}")
        if self.labels_wanted < 0 or self.caution < 0 or self.retrain_every < 1:
            raise ValueError("labels_wanted and caution are at least 0, retrain_every at least 1")


class OnlinePolicy:
    name = ONLINE

    def __init__(
        self,
        weak_model: str,
        strong_model: str,
        prior: TagPrior,
        labels: Mapping[str, np.ndarray],
        settings: OnlineSettings,
        validator: AnswerModel | None = None,
    ) -> None:
        self.weak_model, self.strong_model = weak_model, strong_model
        # The router file's cascade validator: a judge of shadow pairs without recorded grades.
        self.validator = validator
        self.prior = prior
        self.settings = settings
        self.labels: dict[str, np.ndarray] = {tag: counts.copy() for tag, counts in labels.items()}
        self.new_labels: dict[str, np.ndarray] = {}
        self.traffic: Counter[str] = Counter()
        self.calls = 0
        self.shadows = 0
        # Calls and shadow calls per shadow scope (``shadow_scope``).
        self.scope_calls: Counter[str] = Counter()
        self.scope_shadows: Counter[str] = Counter()
        unseen = TagPosterior.of(np.zeros(4), prior)
        self.unseen_share = plan_weak_shares({"": unseen}, {"": 1.0}, settings.target, settings.caution)[""]
        self.shares: dict[str, float] = {}

    @classmethod
    def from_file(cls, router: RouterFile, settings: OnlineSettings) -> OnlinePolicy:
        """Prior fitted to the file's per-tag outcomes, which are also the first labels of those tags."""
        by_tag = {tag: np.array(counts, dtype=float) for tag, counts in router.tag_outcomes.items()}
        if not by_tag:
            raise ValueError("the router file has no per-tag outcomes: train it again with `frugalmesh router train`")
        prior = TagPrior.fit(by_tag)
        return cls(router.weak_model, router.strong_model, prior, by_tag, settings, router.answer_model)

    def weak_share(self, tag: str) -> float:
        return self.shares.get(tag, self.unseen_share)

    def label_count(self, tag: str) -> int:
        return int(self.labels.get(tag, np.zeros(4)).sum() + self.new_labels.get(tag, np.zeros(4)).sum())

    def choose(self, step: StepRequest, catalog: Catalog, *, downgrade: bool = False) -> ModelSpec:
        """Counts the call in its tag's traffic, then routes it by the tag's planned weak share; every
        ``retrain_every`` calls the plan is made again first."""
        if self.calls and self.calls % self.settings.retrain_every == 0:
            self.retrain()
        tag = step_tag(step)
        self.traffic[tag] += 1
        self.calls += 1
        self.scope_calls[self.shadow_scope(step)[0]] += 1
        weak = prompt_uniform(step_prompt(step)) < self.weak_share(tag)
        return resolve_model(self.weak_model if weak else self.strong_model, step, catalog, downgrade=downgrade)

    def shadow_model(self, step: StepRequest, routed: ModelSpec, catalog: Catalog) -> ModelSpec | None:
        """The weak model when this call, routed strong, should also be answered by it; None when not.
        Counts the shadow."""
        tag = step_tag(step)
        if self.label_count(tag) >= self.settings.labels_wanted:
            return None
        scope, share = self.shadow_scope(step)
        if self.scope_shadows[scope] + 1 > share * self.scope_calls[scope]:
            return None
        # Only a call routed strong is shadowed, by the weak model: the label then costs a weak call
        # (about 1/300 of a GPT-4 one) and no call that was kept off the strong model calls it.
        # (A call resolved to a third model, by an allow-list or pacing, is no pair of these two.)
        if routed.name != self.strong_model:
            return None
        if step.allow_models is not None and self.weak_model not in step.allow_models:
            return None
        self.shadows += 1
        self.scope_shadows[scope] += 1
        return catalog.model(self.weak_model)

    def shadow_scope(self, step: StepRequest) -> tuple[str, float]:
        """Whose budget of shadow calls the step's counts in, and its share: the tenant's, else the
        workflow's, else the router's."""
        settings = self.settings
        if step.tenant in settings.tenants:
            return f"tenant:{step.tenant}", settings.tenants[step.tenant]
        if step.workflow in settings.workflows:
            return f"workflow:{step.workflow}", settings.workflows[step.workflow]
        return "", settings.shadow_share

    def learn(self, tag: str, weak_correct: bool, strong_correct: bool) -> None:
        """One judged pair; it counts from the next ``retrain``."""
        self.new_labels.setdefault(tag, np.zeros(4))[outcome_index(weak_correct, strong_correct)] += 1

    def retrain(self) -> None:
        """Fold the new labels in and plan every tag seen in traffic again."""
        for tag, counts in self.new_labels.items():
            self.labels[tag] = self.labels.get(tag, np.zeros(4)) + counts
        self.new_labels = {}
        live = {tag: self.labels.get(tag, np.zeros(4)) for tag in self.traffic}
        prior = self.prior.moved_by(sum(live.values(), np.zeros(4)))
        posteriors = {tag: TagPosterior.of(counts, prior) for tag, counts in live.items()}
        self.shares = plan_weak_shares(posteriors, self.traffic, self.settings.target, self.settings.caution)
