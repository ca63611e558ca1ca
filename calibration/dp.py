"""The exact front of an additive surrogate.

With one loss per (layer, pair) that adds across layers and an integer cost per pair (K + V
bits), choosing one pair per layer to minimize the summed loss under a cost cap is a
multiple-choice knapsack: dynamic programming over (layer, total cost) solves it exactly for
every reachable total at once, in layers x pairs x totals steps (30 x 9 x 960 for SmolLM2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FrontPoint:
    cost: int  # summed pair cost
    loss: float  # summed surrogate loss
    layers: tuple[int, ...]  # pair index per layer


def exact_front(loss: np.ndarray, cost: Sequence[int]) -> list[FrontPoint]:
    """Every Pareto-optimal (cost, loss) choice of one pair per layer, by increasing cost.

    loss[layer, pair] (np.inf: the pair is not allowed on that layer); cost[pair] >= 0 integers.
    A point is on the front when no choice of lower or equal cost has a lower loss; of equal
    losses the cheapest is kept.
    """
    num_layers, num_pairs = loss.shape
    cost = np.asarray(cost, dtype=np.int64)
    total = int(cost.max()) * num_layers
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((num_layers, total + 1), dtype=np.int64)
    for layer in range(num_layers):
        options = np.full((num_pairs, total + 1), np.inf)
        for p in range(num_pairs):
            if np.isfinite(loss[layer, p]):
                options[p, cost[p]:] = best[: total + 1 - cost[p]] + loss[layer, p]
        choice[layer] = options.argmin(axis=0)
        best = options.min(axis=0)
    front, lowest = [], np.inf
    for c in range(total + 1):
        if best[c] < lowest:
            lowest = best[c]
            front.append(FrontPoint(c, float(best[c]), _backtrack(choice, cost, c)))
    return front


def _backtrack(choice: np.ndarray, cost: np.ndarray, total: int) -> tuple[int, ...]:
    layers = []
    for layer in range(choice.shape[0] - 1, -1, -1):
        p = int(choice[layer, total])
        layers.append(p)
        total -= int(cost[p])
    return tuple(reversed(layers))


def best_within(front: Sequence[FrontPoint], max_cost: float) -> FrontPoint | None:
    """The lowest-loss front point of cost <= max_cost (the last one, the front being sorted)."""
    within = [p for p in front if p.cost <= max_cost + 1e-9]
    return within[-1] if within else None
