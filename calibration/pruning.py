"""Step 3: intra-layer pruning. A pair is worth searching only if no other pair of the same
layer has fewer-or-equal bits and lower-or-equal error (with one strict): keep the Pareto set."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pareto_indices(bits: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the non-dominated (bits, error) points, both minimized; exact ties keep the first."""
    points = list(zip(bits, errors, strict=True))

    def dominates(j: int, i: int) -> bool:
        (bj, ej), (b, e) = points[j], points[i]
        return bj <= b and ej <= e and (bj < b or ej < e or j < i)

    return [i for i in range(len(points)) if not any(dominates(j, i) for j in range(len(points)) if j != i)]


def prune(table: torch.Tensor, bits: Sequence[float]) -> list[list[int]]:
    """For each layer (row of `table`, errors per pair), the pair indices on its Pareto front."""
    return [pareto_indices(bits, row.tolist()) for row in table]
