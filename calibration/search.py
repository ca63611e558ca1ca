"""NSGA-II (pymoo) on real evaluations.

Genome: [option index, pair index of layer 0, ..., pair index of layer L-1]. Each candidate is
scored by `evaluate` (a real forward pass with every layer quantized at once, evaluate.Evaluator),
so the front reflects how layers interact, which no sum of single-layer numbers can.
Objectives (both minimized): average bits, KL to the unquantized model; constraint: average bits
<= budget. The surrogate (sensitivity.Surrogate) only steers the operators:

- the initial population is given (the exact surrogate front and the uniform maps, pipeline);
- two-point crossover keeps runs of layers together (and a parent's prefix, which the evaluator
  does not recompute);
- mutation moves a layer to the next cheaper or dearer pair it may use, or switches the option;
- repair brings every child into the band [budget - band, budget] by the surrogate's cheapest
  downgrades / best upgrades per bit, so no evaluation is spent on a map that cannot be chosen.

The result is every map this run evaluated: the front is taken from all of them, not only from
the last population. Runs are deterministic for a seed, and evaluations come from the score
store, so a restarted run replays the finished part without computing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.duplicate import DuplicateElimination
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.optimize import minimize

from calibration.common import SEARCH_PAIRS, Candidate, FormatOption, pair_cost

COSTS = np.array([pair_cost(p) for p in SEARCH_PAIRS])


@dataclass
class Space:
    """What the search may choose: options, the pairs each layer may use, and the surrogate per option."""

    options: list[FormatOption]
    allowed: np.ndarray  # bool [layers, pairs]
    tables: list[np.ndarray]  # per option: [layers, pairs] predicted single-layer KL
    budget: float
    band: float

    @property
    def num_layers(self) -> int:
        return self.allowed.shape[0]

    def max_cost(self) -> int:
        """Largest summed K + V bits within the budget."""
        return int(np.floor(self.budget * 2 * self.num_layers + 1e-9))

    def min_cost(self) -> int:
        return int(np.ceil((self.budget - self.band) * 2 * self.num_layers - 1e-9))

    def genome(self, candidate: Candidate) -> np.ndarray:
        return np.array([self.options.index(candidate.option), *candidate.layers])

    def candidate(self, x: np.ndarray) -> Candidate:
        x = np.asarray(x).round().astype(int)
        return Candidate(self.options[x[0]], tuple(int(p) for p in x[1:]))

    def repair(self, x: np.ndarray) -> np.ndarray:
        """Allowed pairs only, then total cost into [min_cost, max_cost] by surrogate-guided moves."""
        x = np.asarray(x).round().astype(int).copy()
        table = self.tables[x[0]]
        layers = x[1:]
        for layer in range(self.num_layers):
            if not self.allowed[layer, layers[layer]]:
                layers[layer] = self._nearest_allowed(layer, layers[layer], table)
        while COSTS[layers].sum() > self.max_cost() and self._move(layers, table, cheaper=True):
            pass
        while COSTS[layers].sum() < self.min_cost() and self._move(layers, table, cheaper=False):
            pass
        x[1:] = layers
        return x

    def _nearest_allowed(self, layer: int, p: int, table: np.ndarray) -> int:
        choices = np.flatnonzero(self.allowed[layer])
        return int(min(choices, key=lambda q: (abs(COSTS[q] - COSTS[p]), table[layer, q])))

    def _move(self, layers: np.ndarray, table: np.ndarray, cheaper: bool) -> bool:
        """Apply the single-layer change with the best loss per bit (a downgrade or an upgrade that keeps
        the total <= max_cost); False when none exists."""
        total = COSTS[layers].sum()
        best, best_ratio = None, np.inf
        for layer, p in enumerate(layers):
            for q in np.flatnonzero(self.allowed[layer]):
                delta_cost = COSTS[q] - COSTS[p]
                if (delta_cost >= 0) if cheaper else (delta_cost <= 0 or total + delta_cost > self.max_cost()):
                    continue
                ratio = (table[layer, q] - table[layer, p]) / abs(delta_cost)  # downgrade: loss added per bit saved
                ratio = ratio if cheaper else -ratio  # upgrade: loss removed per bit added, best = most negative
                if ratio < best_ratio:
                    best, best_ratio = (layer, q), ratio
        if best is None:
            return False
        layers[best[0]] = best[1]
        return True

    def steps(self, layer: int) -> np.ndarray:
        """The pairs a layer may use, by cost (a mutation moves to a neighbour in this list)."""
        choices = np.flatnonzero(self.allowed[layer])
        return choices[np.argsort(COSTS[choices], kind="stable")]


class MapProblem(Problem):
    def __init__(self, space: Space, evaluate: Callable[[list[Candidate]], list[float]]):
        self.space, self.score = space, evaluate
        self.archive: dict[str, tuple[Candidate, float]] = {}
        upper = np.array([len(space.options) - 1] + [len(SEARCH_PAIRS) - 1] * space.num_layers)
        super().__init__(n_var=1 + space.num_layers, n_obj=2, n_ieq_constr=1, xl=0, xu=upper, vtype=int)

    def _evaluate(self, X, out, *args, **kwargs):
        candidates = [self.space.candidate(x) for x in X]
        kl = self.score(candidates)
        for candidate, value in zip(candidates, kl, strict=True):
            self.archive[candidate.key] = (candidate, value)
        bits = np.array([c.avg_bits for c in candidates])
        out["F"] = np.column_stack([bits, kl])
        out["G"] = (bits - self.space.budget)[:, None]


class StepMutation(Mutation):
    """Per layer (probability layer_prob): the next cheaper or dearer allowed pair; the option gene
    (probability option_prob): another option."""

    def __init__(self, space: Space, layer_prob: float, option_prob: float):
        super().__init__(prob=1.0)
        self.space, self.layer_prob, self.option_prob = space, layer_prob, option_prob

    def _do(self, problem, X, random_state=None, **kwargs):
        X = np.asarray(X).round().astype(int).copy()
        for x in X:
            if len(self.space.options) > 1 and random_state.random() < self.option_prob:
                x[0] = random_state.choice([i for i in range(len(self.space.options)) if i != x[0]])
            for layer in range(self.space.num_layers):
                if random_state.random() < self.layer_prob:
                    steps = list(self.space.steps(layer))
                    at = steps.index(x[1 + layer]) if x[1 + layer] in steps else 0
                    x[1 + layer] = steps[int(np.clip(at + random_state.choice([-1, 1]), 0, len(steps) - 1))]
        return X


class BandRepair(Repair):
    def __init__(self, space: Space):
        super().__init__()
        self.space = space

    def _do(self, problem, X, **kwargs):
        return np.array([self.space.repair(x) for x in X])


class SameGenome(DuplicateElimination):
    """Children equal (as integer genomes) to each other or to a member of `other` are duplicates."""

    def _do(self, pop, other, is_duplicate):
        seen = {_genome(ind) for ind in other} if other is not None else set()
        for i, ind in enumerate(pop):
            key = _genome(ind)
            is_duplicate[i] = key in seen
            seen.add(key)
        return is_duplicate


def _genome(individual) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in individual.X)


def initial_population(space: Space, seeds: Sequence[Candidate], size: int, rng: np.random.Generator,
                       mutation: StepMutation) -> np.ndarray:
    """The seeds (deduplicated, in order), topped up to `size` with repaired mutants of them."""
    rows, seen = [], set()
    for x in [space.genome(s) for s in seeds]:
        if tuple(x) not in seen:
            seen.add(tuple(x))
            rows.append(x)
    attempts = 0
    while len(rows) < size and rows and attempts < 50 * size:
        attempts += 1
        parent = rows[int(rng.integers(len(rows)))][None]
        child = space.repair(mutation._do(None, parent, random_state=rng)[0])
        if tuple(child) not in seen:
            seen.add(tuple(child))
            rows.append(child)
    return np.array(rows, dtype=float)


@dataclass
class SearchResult:
    evaluated: list[tuple[Candidate, float]]  # every (map, calibration KL) of the run, in evaluation order
    initial: set[str]  # keys of the initial population (the seeds and their mutants)


def search(space: Space, seeds: Sequence[Candidate], evaluate: Callable[[list[Candidate]], list[float]],
           pop_size: int, offspring: int, generations: int, seed: int) -> SearchResult:
    rng = np.random.default_rng(seed)
    mutation = StepMutation(space, layer_prob=1.5 / space.num_layers, option_prob=0.1)
    problem = MapProblem(space, evaluate)
    population = initial_population(space, seeds, pop_size, rng, mutation)
    algorithm = NSGA2(
        pop_size=pop_size,
        n_offsprings=offspring,
        sampling=population,
        crossover=TwoPointCrossover(),
        mutation=mutation,
        repair=BandRepair(space),
        eliminate_duplicates=SameGenome(),
    )
    minimize(problem, algorithm, ("n_gen", generations), seed=seed, verbose=False)
    return SearchResult(list(problem.archive.values()), {space.candidate(x).key for x in population})


def pareto_front(points: Sequence[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
    """The non-dominated (avg bits, KL) points, by increasing bits (ties: the first seen)."""
    front = []
    for candidate, kl in sorted(points, key=lambda item: (item[0].avg_bits, item[1])):
        if not front or kl < front[-1][1]:
            front.append((candidate, kl))
    return front
