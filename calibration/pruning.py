"""Step 3: intra-layer pruning. A pair is worth searching only if no other pair of the same
layer has fewer-or-equal bits and lower-or-equal error (with one strict): keep the Pareto set."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pareto_indices(bits: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the non-dominated (bits, error) points, both minimized; exact ties keep the first."""
    keep = []
    for i, (b, e) in enumerate(zip(bits, errors)):
        dominated = any(
            (bj <= b and ej <= e) and (bj < b or ej < e or j < i) for j, (bj, ej) in enumerate(zip(bits, errors)) if j != i
        )
        if not dominated:
            keep.append(i)
    return keep


def prune(table: torch.Tensor, bits: Sequence[float]) -> list[list[int]]:
    """For each layer (row of `table`, errors per pair), the pair indices on its Pareto front."""
    return [pareto_indices(bits, row.tolist()) for row in table]
