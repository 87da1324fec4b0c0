"""What one task's run knows while its steps run, and how a step says it produced nothing.

A ``TaskState`` is shared by the DAG scheduler, the step kinds and the per-call defences of one
task: the artifacts so far, what was spent and what is in flight, how often each call was sent and
the fan-out slots. It needs no lock: every change happens on the event loop between awaits.
``StepFailed`` carries why a step stopped, with a kind the task's terminal event is decided on.
``EarlierRuns`` carries what a run that raised had sent and spent to the task's next run.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from schemas.messages import Artifact, ArtifactRef, Task
from services.planner.workflow import Workflow
from services.runtime.bus import now_ms

# Why a step may stop that is a defence doing its job: announced as a ``refused`` event.
REFUSALS = frozenset({"refused", "budget", "deadline", "loop"})


class StepFailed(Exception):
    """Why a step produced no artifact; ``kind`` is an ErrorKind (or ``budget``), ``retryable`` allows one more try."""

    def __init__(self, reason: str, kind: str = "error", retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.retryable = retryable


@dataclass(frozen=True)
class RunTotals:
    """What a task's runs have sent (model calls, retries included) and spent, in USD."""

    calls: int = 0
    cost_usd: float = 0.0


@dataclass
class TaskState:
    """One task's run, from its pre-flight check to its terminal event."""

    task: Task
    workflow: Workflow
    deadline_ms: int
    # Per finished step id: its artifact.
    refs: dict[str, ArtifactRef] = field(default_factory=dict)
    # Every artifact a step or an item produced, in order: the candidates for a ``partial`` result.
    produced: list[ArtifactRef] = field(default_factory=list)
    # This run's spend and calls; the budget checks read these (the accountant's task cap counts earlier runs).
    cost_usd: float = 0.0
    calls: int = 0
    # What the task's earlier runs in this process had sent and spent (``EarlierRuns``): only reported.
    earlier: RunTotals = field(default_factory=RunTotals)
    # Worst cases of the calls in flight: spent plus these must stay within the budget.
    in_flight_usd: float = 0.0
    # How often each call (by role and messages) was sent.
    call_counts: Counter[str] = field(default_factory=Counter)
    # The task's inputs, fetched when a step runs once per input.
    inputs: list[Artifact] = field(default_factory=list)
    # One per model call in flight (a step's, or an item's of a for_each step): the fan-out cap.
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def totals(self) -> RunTotals:
        """What the task has sent and spent in all: this run and its earlier runs here."""
        return RunTotals(self.earlier.calls + self.calls, self.earlier.cost_usd + self.cost_usd)

    def left_s(self) -> float:
        """Seconds until the task's deadline (negative once it passed)."""
        return (self.deadline_ms - now_ms()) / 1000

    def keep(self, ref: ArtifactRef) -> None:
        """Count ``ref`` among the task's results (once, however many steps return it)."""
        if ref not in self.produced:
            self.produced.append(ref)


class EarlierRuns:
    """Per task, what its runs that raised in this process had sent and spent, until its next run here
    takes it. A run that raises after its calls (JetStream not answering while it stores an artifact or
    the terminal event) is handed back for another delivery; without this the next run would count from
    zero, and the terminal event's ``calls`` and ``cost_usd`` would leave out the calls the usage rows and
    the task's budget hold. Not carried: runs on another replica, or in a process that died (known gap).

    At most ``limit`` tasks are kept, the oldest dropped first: a task delivered again to another replica
    never comes back for its entry."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._totals: OrderedDict[tuple[str, str], RunTotals] = OrderedDict()

    def keep(self, task: Task, totals: RunTotals) -> None:
        """``task``'s runs here so far sent and spent ``totals``; its next run here reports them with its own."""
        self._totals[(task.tenant, task.id)] = totals
        while len(self._totals) > self.limit:
            self._totals.popitem(last=False)

    def take(self, task: Task) -> RunTotals:
        """What earlier runs of ``task`` here sent and spent (zeros for a first run), forgotten here."""
        return self._totals.pop((task.tenant, task.id), RunTotals())
