"""Step 5: NSGA-II (pymoo) over the groups' pair choices.

Objectives (both minimized): average bits of the map, and the surrogate end-to-end loss, the sum
of the chosen pairs' single-layer next-token KL (KL of small independent perturbations adds to
first order). Constraint: average bits <= budget. Every evaluation is a table lookup, so the
search takes seconds; the front it returns is then checked with real forward passes (evaluate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize


@dataclass(frozen=True)
class FrontPoint:
    layers: tuple[int, ...]  # pair index per layer
    avg_bits: float
    surrogate: float  # summed single-layer KL


class GroupChoiceProblem(Problem):
    """x[g] indexes group g's candidate list; objectives (avg bits, summed KL); g: avg bits - budget."""

    def __init__(self, loss: np.ndarray, bits: np.ndarray, labels: Sequence[int], candidates, budget: float):
        self.loss, self.bits, self.budget = loss, bits, budget
        self.labels = np.asarray(labels)
        self.candidates = [np.asarray(c) for c in candidates]
        upper = np.array([len(c) - 1 for c in candidates])
        super().__init__(n_var=len(candidates), n_obj=2, n_ieq_constr=1, xl=0, xu=upper, vtype=int)

    def layer_pairs(self, x: np.ndarray) -> np.ndarray:
        """[n, groups] choices -> [n, layers] pair indices."""
        x = np.asarray(x).round().astype(int)
        per_group = np.stack([c[x[:, g]] for g, c in enumerate(self.candidates)], axis=1)
        return per_group[:, self.labels]

    def _evaluate(self, x, out, *args, **kwargs):
        pairs = self.layer_pairs(x)
        avg_bits = self.bits[pairs].mean(axis=1)
        loss = np.take_along_axis(self.loss, pairs.T, axis=1).sum(axis=0)
        out["F"] = np.column_stack([avg_bits, loss])
        out["G"] = (avg_bits - self.budget)[:, None]


def greedy_path(problem: GroupChoiceProblem) -> list[np.ndarray]:
    """Marginal-gain allocation: from every group's cheapest pair, repeatedly take the upgrade that removes
    the most loss per added bit. Each step is a good map at its size; seeding NSGA-II with them makes the
    front near any budget good from the first generation (the random rest keeps it exploring)."""
    sizes = np.bincount(problem.labels, minlength=len(problem.candidates))
    group_bits = [problem.bits[c] * sizes[g] for g, c in enumerate(problem.candidates)]
    group_loss = [problem.loss[problem.labels == g][:, c].sum(0) for g, c in enumerate(problem.candidates)]
    x = np.array([int(np.argmin(b)) for b in group_bits])
    path = [x.copy()]
    while True:
        best = None  # (loss change per bit, group, choice)
        for g in range(len(x)):
            added = group_bits[g] - group_bits[g][x[g]]
            removed = group_loss[g] - group_loss[g][x[g]]
            for j in np.flatnonzero((added > 0) & (removed < 0)):
                if best is None or removed[j] / added[j] < best[0]:
                    best = (removed[j] / added[j], g, j)
        if best is None:
            return path
        x[best[1]] = best[2]
        path.append(x.copy())


def initial_population(problem: GroupChoiceProblem, size: int, rng: np.random.Generator) -> np.ndarray:
    """The greedy path's maps within the budget, the 'same rank in every group' maps (uniform-like
    corners), and random choices for the rest."""
    upper = problem.xu.astype(int)
    greedy = [x for x in greedy_path(problem) if problem.bits[problem.layer_pairs(x[None])].mean() <= problem.budget]
    rows = greedy[-size // 2 :] + [np.minimum(rank, upper) for rank in range(int(upper.max()) + 1)]
    rows += [rng.integers(0, upper + 1) for _ in range(max(0, size - len(rows)))]
    return np.array(rows[:size], dtype=float)


def search(
    loss: torch.Tensor,
    bits: Sequence[float],
    labels: Sequence[int],
    candidates: Sequence[Sequence[int]],
    budget: float,
    seed: int,
    pop_size: int = 128,
    generations: int = 200,
) -> list[FrontPoint]:
    """The feasible Pareto front (sorted by bits, one point per distinct map)."""
    # Unmeasured pairs (pruned before the KL pass) are NaN in `loss`; the candidates never use them.
    problem = GroupChoiceProblem(np.nan_to_num(loss.numpy(), nan=np.inf), np.asarray(bits), labels, candidates, budget)
    rng = np.random.default_rng(seed)
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=initial_population(problem, pop_size, rng),
        crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    result = minimize(problem, algorithm, ("n_gen", generations), seed=seed, verbose=False)
    if result.X is None:
        return []
    x = np.atleast_2d(result.X)
    points = {}
    for layers, (avg_bits, surrogate) in zip(problem.layer_pairs(x), np.atleast_2d(result.F), strict=True):
        key = tuple(int(p) for p in layers)
        points[key] = FrontPoint(key, float(avg_bits), float(surrogate))
    return sorted(points.values(), key=lambda p: (p.avg_bits, p.surrogate))
