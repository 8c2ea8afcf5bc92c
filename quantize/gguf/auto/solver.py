"""Choose one option per tensor (or tensor group): least predicted KLD within a budget.

A multiple-choice knapsack (each tensor picks one of its options; cost = exact bytes, or bits for
gptq:auto; value =
predicted KLD, assumed additive over tensors). Solved by the usual Lagrangian relaxation: from
every tensor's cheapest option, take upgrades along each tensor's lower convex hull of
(bytes, KLD) in order of KLD saved per byte while they fit; then, with what is left, any upgrade
(hull or not) that fits, best saving per byte first, until none fits. The result is within the
budget by construction; it is optimal for every budget that ends exactly on a hull step, and
otherwise leaves at most one hull step unused (small against the budget when tensors are many).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    type: str
    cost: int  # counted against the budget: bytes for gguf:auto, bits for gptq:auto
    kld: float  # predicted contribution


@dataclass
class Solution:
    choice: dict[str, Option]  # tensor -> chosen option
    cost: int
    kld: float
    budget: int


class BudgetTooSmall(ValueError):
    def __init__(self, smallest: int, budget: int) -> None:
        super().__init__(f"budget {budget} below the smallest possible {smallest}")
        self.smallest, self.budget = smallest, budget


def _hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (cost, kld), cost ascending, kld strictly falling."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.cost, o.kld)):
        if pts and o.kld >= pts[-1].kld:
            continue  # dominated: costs no less, predicts no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b when it lies on or above the segment a→o
            if (b.kld - a.kld) * (o.cost - a.cost) >= (o.kld - a.kld) * (b.cost - a.cost):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def solve(options: Mapping[str, list[Option]], budget: int) -> Solution:
    """``options``: per tensor, its choices. Raises BudgetTooSmall when even the cheapest choice
    of every tensor exceeds ``budget``."""
    hulls = {name: _hull(opts) for name, opts in options.items() if opts}
    choice = {name: h[0] for name, h in hulls.items()}
    spent = sum(o.cost for o in choice.values())
    if spent > budget:
        raise BudgetTooSmall(spent, budget)

    # phase 1: hull steps by KLD saved per byte
    pos = dict.fromkeys(hulls, 0)
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], pos[name]
        if i + 1 < len(h):
            a, b = h[i], h[i + 1]
            heapq.heappush(heap, (-(a.kld - b.kld) / max(b.cost - a.cost, 1), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pos[name]
        step = h[i + 1].cost - h[i].cost
        if spent + step > budget:
            continue  # this tensor's next step does not fit; others' smaller ones may
        spent += step
        pos[name] = i + 1
        choice[name] = h[i + 1]
        push(name)

    # phase 2: fill what is left with any improving option that fits
    while True:
        best: tuple[float, str, Option] | None = None
        left = budget - spent
        for name, opts in options.items():
            cur = choice.get(name)
            if cur is None:
                continue
            for o in opts:
                extra = o.cost - cur.cost
                gain = cur.kld - o.kld
                if gain <= 0 or extra > left:
                    continue
                rate = gain / max(extra, 1)
                if best is None or rate > best[0]:
                    best = (rate, name, o)
        if best is None:
            break
        _, name, o = best
        spent += o.cost - choice[name].cost
        choice[name] = o
    return Solution(choice, spent, sum(o.kld for o in choice.values()), budget)
