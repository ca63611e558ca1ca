"""Step 4: inter-layer clustering. Layers whose sensitivity profiles (log error across the
candidate pairs) look alike get one shared choice in the search, which shrinks its space from
|pairs|^layers to |pairs|^groups and averages out noise in single-layer measurements."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from calibration.pruning import pareto_indices

FLOOR = 1e-9  # errors below this count as zero (a log profile needs a floor)


def profiles(table: torch.Tensor) -> np.ndarray:
    """log10 of each layer's error per pair: the shape of its sensitivity, scale included."""
    return np.log10(np.clip(table.double().numpy(), FLOOR, None))


def profile_table(kl: torch.Tensor, attention_error: torch.Tensor) -> torch.Tensor:
    """What to cluster on: the single-layer KL (what the search sums) of the pairs measured on every
    layer (pruning leaves NaN elsewhere), else the attention error, which is complete."""
    everywhere = ~kl.isnan().any(0) & (kl.abs().sum(0) > 0)  # measured on all layers, and not KV16's zeros
    return kl[:, everywhere] if int(everywhere.sum()) >= 2 else attention_error[:, 1:]


def cluster_layers(table: torch.Tensor, num_groups: int) -> list[int]:
    """Group label per layer (0.., numbered by first layer) from Ward clustering of the profiles."""
    num_layers = table.shape[0]
    if num_layers == 1 or num_groups <= 1:
        return [0] * num_layers
    labels = fcluster(linkage(profiles(table), method="ward"), t=min(num_groups, num_layers), criterion="maxclust")
    order = {label: rank for rank, label in enumerate(dict.fromkeys(labels.tolist()))}
    return [order[label] for label in labels.tolist()]


def group_candidates(
    table: torch.Tensor, labels: Sequence[int], kept: Sequence[Sequence[int]], bits: Sequence[float]
) -> list[list[int]]:
    """Pair indices each group may choose: the Pareto set, on the group's summed error, of its members' kept pairs."""
    candidates = []
    for group in range(max(labels) + 1):
        members = [i for i, label in enumerate(labels) if label == group]
        pool = sorted({p for i in members for p in kept[i]})
        summed = table[members][:, pool].sum(0).tolist()
        candidates.append([pool[i] for i in pareto_indices([bits[p] for p in pool], summed)])
    return candidates
