"""What ``mesh.budget.show`` answers (``frugalmesh budget show``): the caps in force and the spend against them.

Read-only over the accountant's ``BudgetBook`` and ``Ledger``, so it can be called between two
decisions without changing either. Only the current UTC day and month are listed (past periods
bind nothing), plus task buckets when tasks are asked for; a scope with a cap but no spend yet
is listed at zero, so an operator sees every cap that can refuse a call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from schemas.messages import BudgetCap, BudgetQuery, BudgetSpend, BudgetState, SpendScope, SpendWindow
from services.accountant.budget import BudgetBook
from services.accountant.ledger import Bucket, Ledger, day_period, dollars, month_period


def budget_state(
    query: BudgetQuery, book: BudgetBook, ledger: Ledger, cap_of: Callable[[Bucket], int | None], now: int
) -> BudgetState:
    """The caps and spend ``query`` asks for, at ``now`` (ms); ``cap_of`` gives a bucket's cap in force."""
    periods = {"day": day_period(now), "month": month_period(now)}

    def wanted(scope: str, key: str) -> bool:
        if query.scope is None:
            return scope != "task"  # tasks are many: listed only when asked for
        return scope == query.scope and (query.key is None or key == query.key)

    caps: list[BudgetCap] = [c for c in book.all() if wanted(c.scope, c.key)]
    buckets: set[Bucket] = {
        (c.scope, c.key, window, periods[window])
        for c in caps
        for window, value in (("day", c.day_usd), ("month", c.month_usd))
        if value is not None
    }
    for bucket in (*ledger.settled, *ledger.reserved):
        scope, key, window, period = bucket
        if wanted(scope, key) and (window == "task" or period == periods[window]):
            buckets.add(bucket)
    spend = []
    for bucket in sorted(buckets):
        cap = cap_of(bucket)
        spend.append(
            BudgetSpend(
                scope=cast(SpendScope, bucket[0]),
                key=bucket[1],
                window=cast(SpendWindow, bucket[2]),
                period=bucket[3],
                settled_usd=dollars(ledger.settled.get(bucket, 0)),
                reserved_usd=dollars(ledger.reserved.get(bucket, 0)),
                cap_usd=None if cap is None else dollars(cap),
            )
        )
    return BudgetState(caps=caps, spend=spend, outstanding=len(ledger.holds), time_ms=now)
