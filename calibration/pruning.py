"""Intra-layer pruning: a pair is worth searching on a layer only if no other pair of that layer
costs fewer-or-equal bits with lower-or-equal predicted loss (one strict): keep the Pareto set.
The exact front never uses a dominated pair, so pruning only removes moves the search would
waste real evaluations on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_indices(bits: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the non-dominated (bits, error) points, both minimized; exact ties keep the first."""
    points = list(zip(bits, errors, strict=True))

    def dominates(j: int, i: int) -> bool:
        (bj, ej), (b, e) = points[j], points[i]
        return bj <= b and ej <= e and (bj < b or ej < e or j < i)

    return [i for i in range(len(points)) if not any(dominates(j, i) for j in range(len(points)) if j != i)]


def allowed_pairs(tables: Sequence[np.ndarray], costs: Sequence[float]) -> np.ndarray:
    """bool [layers, pairs]: the pair is on the layer's Pareto set under at least one option's table."""
    allowed = np.zeros(tables[0].shape, dtype=bool)
    for table in tables:
        for layer, row in enumerate(table):
            allowed[layer, pareto_indices(costs, row.tolist())] = True
    return allowed
