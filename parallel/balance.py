"""Balancing work over data-parallel ranks: items split into equal-count parts of about equal cost.

Under data parallelism every rank waits for the slowest at each gradient all-reduce, so a rank that drew the long
completions sets the step's pace (verl's `trainer.balance_batch`, with its Karmarkar-Karp partition in
`utils/seqlen_balancing.py`). Every part gets the same number of items: the loss weights that count sequences
(grpo's and dr_grpo's per-sequence means, a rank's share of the minibatch) then stay what they were.
"""

from __future__ import annotations

__all__ = ["equal_count_partition", "load_spread"]


def equal_count_partition(costs: list[int], parts: int) -> list[list[int]]:
    """The indices of `costs` in `parts` parts of len(costs) // parts items each, loads balanced: largest first
    into the lightest part that still has room (LPT with a cardinality limit), then swaps of one item of the
    heaviest part for a cheaper one of the lightest while a swap narrows their gap. Deterministic (ties go to the
    lower index). Returns each part's indices, sorted."""
    if parts < 1 or len(costs) % parts:
        raise ValueError(f"{len(costs)} items do not split into {parts} equal parts")
    size = len(costs) // parts
    bins: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        j = min((j for j in range(parts) if len(bins[j]) < size), key=lambda j: (loads[j], j))
        bins[j].append(i)
        loads[j] += costs[i]
    for _ in range(len(costs) * parts):  # each swap narrows the spread; bounded for safety
        heavy = max(range(parts), key=lambda j: (loads[j], -j))
        light = min(range(parts), key=lambda j: (loads[j], j))
        gap = loads[heavy] - loads[light]
        best: tuple[int, int, int] | None = None  # (new gap, item of heavy, item of light)
        for a in bins[heavy]:
            for b in bins[light]:
                moved = costs[a] - costs[b]
                if 0 < moved < gap and (best is None or abs(gap - 2 * moved) < best[0]):
                    best = (abs(gap - 2 * moved), a, b)
        if best is None or best[0] >= gap:
            break
        _, a, b = best
        bins[heavy][bins[heavy].index(a)], bins[light][bins[light].index(b)] = b, a
        loads[heavy] += costs[b] - costs[a]
        loads[light] += costs[a] - costs[b]
    return [sorted(b) for b in bins]


def load_spread(costs: list[int], partition: list[list[int]]) -> float:
    """The heaviest part's load over the mean load (1.0 = perfectly balanced; 0 loads count as balanced)."""
    loads = [sum(costs[i] for i in part) for part in partition]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
