"""Allocators: how a memory budget is spread over the states of a model's parameters.

An allocation problem is a list of ``Item`` (one per state of one parameter), each with its candidate specs,
their exact bytes and an error estimate, and a budget in bytes. Every allocator returns one choice per item
whose bytes sum to at most the budget (by construction: it starts from the cheapest choice of every item,
which the ``Budget`` policy has checked fits, and only ever takes an upgrade that still fits).

- ``fixed_allocation``: a depth/type rule: embeddings first, then parameters in model order (earliest blocks
  first), each upgraded to its most precise candidate while the budget allows; the rest keep the cheapest.
- ``knapsack_allocation``: minimum total error for the bytes (a multiple-choice knapsack), solved greedily on
  each item's lower convex hull of (bytes, error): upgrades are taken by error reduction per byte. The greedy
  solution is within ``gap`` (the largest single error reduction it could not afford) of the optimum of the
  relaxed problem, hence of the exact optimum; the gap is returned so reports can state it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Item:
    """One state of one parameter in an allocation.

    Attributes:
        key: ``(parameter index, state name)``.
        specs: candidate specs, from cheapest to most precise (as the policy lists them).
        nbytes: exact bytes of each candidate for this parameter.
        error: estimated error of each candidate (any non-negative scale common to all items; 0 = exact).
        priority: order of the fixed rule (lower is upgraded first).
    """

    key: tuple[int, str]
    specs: list
    nbytes: list[int]
    error: list[float] = field(default_factory=list)
    priority: float = 0.0

    def cheapest(self) -> int:
        return min(range(len(self.specs)), key=lambda i: (self.nbytes[i], -self.precision(i)))

    def precision(self, i: int) -> int:
        """Candidates are listed from cheapest to most precise: the position is the precision rank."""
        return i


def fixed_allocation(items: list[Item], budget: int) -> tuple[dict, float]:
    """The depth/type rule: items in ``priority`` order each get their most precise candidate that fits."""
    choice = {it.key: it.cheapest() for it in items}
    used = sum(it.nbytes[choice[it.key]] for it in items)
    for it in sorted(items, key=lambda it: it.priority):
        base = it.nbytes[choice[it.key]]
        for i in sorted(range(len(it.specs)), key=it.precision, reverse=True):
            if used - base + it.nbytes[i] <= budget:
                used += it.nbytes[i] - base
                choice[it.key] = i
                break
    return choice, 0.0


def _hull(item: Item) -> list[int]:
    """Candidate indices on the lower convex hull of (bytes, error), by increasing bytes: the only candidates a
    greedy by error reduction per byte should step through (the others are dominated)."""
    order = sorted(range(len(item.specs)), key=lambda i: (item.nbytes[i], item.error[i]))
    hull: list[int] = []
    for i in order:
        if hull and item.error[i] >= item.error[hull[-1]]:
            continue  # more bytes, no less error: dominated
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies above the segment a -> i: it is never the best step
            slope_ab = (item.error[a] - item.error[b]) / max(item.nbytes[b] - item.nbytes[a], 1)
            slope_ai = (item.error[a] - item.error[i]) / max(item.nbytes[i] - item.nbytes[a], 1)
            if slope_ai >= slope_ab:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def knapsack_allocation(items: list[Item], budget: int) -> tuple[dict, float]:
    """Least total error within ``budget``: greedy upgrades along each item's hull by error reduction per byte.

    Returns ``(choice, gap)``: ``choice[key]`` is the index of the chosen candidate; ``gap`` bounds how much
    lower the optimal total error could be (the largest error reduction of an upgrade that did not fit).
    """
    hulls = {it.key: _hull(it) for it in items}
    pos = dict.fromkeys(hulls, 0)
    choice = {key: h[0] for key, h in hulls.items()}
    by_key = {it.key: it for it in items}
    used = sum(by_key[k].nbytes[i] for k, i in choice.items())
    heap: list = []

    def push(key):
        h, k = hulls[key], pos[key]
        if k + 1 < len(h):
            it = by_key[key]
            gain = it.error[h[k]] - it.error[h[k + 1]]
            cost = it.nbytes[h[k + 1]] - it.nbytes[h[k]]
            heapq.heappush(heap, (-gain / max(cost, 1), key, k))

    for key in hulls:
        push(key)
    gap = 0.0
    while heap:
        _, key, k = heapq.heappop(heap)
        if pos[key] != k:
            continue
        it, h = by_key[key], hulls[key]
        cost = it.nbytes[h[k + 1]] - it.nbytes[h[k]]
        if used + cost > budget:
            gap = max(gap, it.error[h[k]] - it.error[h[k + 1]])
            continue
        used += cost
        pos[key] = k + 1
        choice[key] = h[k + 1]
        push(key)
    return choice, gap


ALLOCATORS = {"fixed": fixed_allocation, "data": knapsack_allocation}
