"""NSGA-II on a synthetic model: each (layer, pair) has a known loss, and the 'real' evaluation adds an
interaction between neighbouring layers that no per-layer table sees (so the front is the real one)."""

import numpy as np
import pytest

from calibration import dp, pruning, search
from calibration.common import SEARCH_PAIRS, Candidate, FormatOption, pair, pair_bits, pair_cost

COSTS = [pair_cost(p) for p in SEARCH_PAIRS]
BITS = np.array([pair_bits(p) for p in SEARCH_PAIRS])
OPTIONS = [FormatOption("per-token-group", 32, 0, 32), FormatOption("kivi", 32, 32, 32)]
LAYERS = 8


def tables(seed=0):
    rng = np.random.default_rng(seed)
    scale = 10 ** rng.uniform(-3, -1, size=(LAYERS, 1))
    base = scale * np.exp(-BITS)[None, :] * rng.uniform(0.5, 1.5, size=(LAYERS, len(BITS)))
    base[:, 0] = 0.0
    return [base, base * 0.7]  # the second option is better everywhere


class RealModel:
    """KL = the option's table summed, plus a penalty when two neighbouring layers both take <= 3 bits."""

    def __init__(self):
        self.tables = tables()
        self.calls = 0

    def kl(self, candidate: Candidate) -> float:
        table = self.tables[OPTIONS.index(candidate.option)]
        additive = sum(table[layer, p] for layer, p in enumerate(candidate.layers))
        low = [BITS[p] <= 3 for p in candidate.layers]
        return float(additive + 0.01 * sum(a and b for a, b in zip(low, low[1:])))

    def __call__(self, candidates):
        self.calls += len(candidates)
        return [self.kl(c) for c in candidates]


def space(budget=4.0, band=1.0):
    t = tables()
    return search.Space(OPTIONS, pruning.allowed_pairs(t, COSTS), t, budget, band)


def seeds(s: search.Space) -> list[Candidate]:
    found = []
    for option, table in zip(s.options, s.tables):
        found.append(Candidate(option, dp.best_within(dp.exact_front(table, COSTS), s.max_cost()).layers))
        found.append(Candidate(option, (SEARCH_PAIRS.index(pair(4, 4)),) * LAYERS))
    return found


def run(s, model, seed=0):
    return search.search(s, seeds(s), model, pop_size=8, offspring=6, generations=5, seed=seed)


def test_every_evaluated_map_is_in_the_band_and_uses_allowed_pairs():
    s, model = space(), RealModel()
    result = run(s, model)
    assert len(result.evaluated) > len(seeds(s))
    for candidate, kl in result.evaluated:
        assert s.min_cost() <= sum(COSTS[p] for p in candidate.layers) <= s.max_cost()
        assert all(s.allowed[layer, p] for layer, p in enumerate(candidate.layers))
        assert kl == model.kl(candidate)
    assert {c.key for c in seeds(s)} <= result.initial <= {c.key for c, _ in result.evaluated}


def test_front_is_non_dominated_and_covers_the_archive():
    result = run(space(), RealModel())
    front = search.pareto_front(result.evaluated)
    assert all(a[0].avg_bits < b[0].avg_bits and a[1] > b[1] for a, b in zip(front, front[1:]))
    for candidate, kl in result.evaluated:
        assert any(f.avg_bits <= candidate.avg_bits and fkl <= kl for f, fkl in front)


def test_the_search_beats_the_additive_optimum_when_layers_interact():
    """The DP seed is optimal for the table, not for the real model: the search finds a better map at <= budget."""
    s, model = space(), RealModel()
    result = run(s, model)
    best_seed = min(model.kl(c) for c in seeds(s) if c.avg_bits <= 4.0)
    best = min(kl for c, kl in result.evaluated if c.avg_bits <= 4.0)
    assert best < best_seed


def test_seeded_runs_replay_exactly():
    first, second = RealModel(), RealModel()
    a, b = run(space(), first, seed=3), run(space(), second, seed=3)
    assert [c.key for c, _ in a.evaluated] == [c.key for c, _ in b.evaluated]
    assert first.calls == second.calls


@pytest.mark.parametrize("seed", range(5))
def test_repair_brings_any_genome_into_the_band(seed):
    s = space(budget=3.25, band=0.5)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        x = np.concatenate([[rng.integers(len(OPTIONS))], rng.integers(0, len(SEARCH_PAIRS), size=LAYERS)])
        fixed = s.repair(x)
        assert fixed[0] == x[0]
        assert s.min_cost() <= sum(COSTS[p] for p in fixed[1:]) <= s.max_cost()
        assert all(s.allowed[layer, p] for layer, p in enumerate(fixed[1:]))


class Killed(Exception):
    pass


def test_a_killed_run_resumes_from_stored_scores_to_the_same_result():
    """Scores are stored as they come; a rerun reads them back, replays the same path and computes only the rest."""
    model, store = RealModel(), {}

    def evaluate(candidates, kill_after=None):
        out = []
        for c in candidates:
            if c.key not in store:
                if kill_after is not None and len(store) >= kill_after:
                    raise Killed
                store[c.key] = model.kl(c)
            out.append(store[c.key])
        return out

    with pytest.raises(Killed):
        search.search(space(), seeds(space()), lambda cs: evaluate(cs, kill_after=15), 8, 6, 5, seed=1)
    assert len(store) == 15
    resumed = search.search(space(), seeds(space()), evaluate, 8, 6, 5, seed=1)
    uninterrupted = run(space(), RealModel(), seed=1)
    assert [c.key for c, _ in resumed.evaluated] == [c.key for c, _ in uninterrupted.evaluated]
    assert len(store) == len(resumed.evaluated)
