import numpy as np
import torch

from calibration import search
from calibration.common import SEARCH_PAIRS, pair_bits

BITS = [pair_bits(p) for p in SEARCH_PAIRS]


def _table(num_layers=12, seed=0):
    """Single-layer losses that fall with bits, some layers far more sensitive than others."""
    rng = np.random.default_rng(seed)
    scale = 10 ** rng.uniform(-4, -1, size=(num_layers, 1))
    loss = scale * np.exp(-np.array(BITS))[None, :] * rng.uniform(0.5, 1.5, size=(num_layers, len(BITS)))
    loss[:, 0] = 0.0
    return torch.tensor(loss)


def _run(budget, seed, labels=None):
    loss = _table()
    labels = labels or list(range(loss.shape[0]))
    candidates = [list(range(len(BITS)))] * (max(labels) + 1)
    return search.search(loss, BITS, labels, candidates, budget, seed, pop_size=40, generations=40), loss


def test_front_respects_the_budget_and_is_non_dominated():
    front, loss = _run(4.0, seed=1)
    assert front and all(p.avg_bits <= 4.0 + 1e-9 for p in front)
    for p in front:
        assert np.isclose(p.avg_bits, np.mean([BITS[i] for i in p.layers]))
        assert np.isclose(p.surrogate, sum(loss[layer, i].item() for layer, i in enumerate(p.layers)))
        assert not any(q.avg_bits <= p.avg_bits and q.surrogate < p.surrogate for q in front)
    # sensitive layers get more bits than insensitive ones at the best point under the budget
    best = front[-1]
    sensitivity = loss[:, -1].numpy()
    assert BITS[best.layers[int(sensitivity.argmax())]] >= BITS[best.layers[int(sensitivity.argmin())]]


def test_seeded_and_reproducible():
    a, _ = _run(3.5, seed=7)
    b, _ = _run(3.5, seed=7)
    assert a == b


def test_groups_share_a_choice():
    labels = [0, 0, 1, 1, 2, 2] * 2
    front, _ = _run(4.0, seed=0, labels=labels)
    for p in front:
        for group in range(3):
            assert len({p.layers[i] for i, g in enumerate(labels) if g == group}) == 1


def test_greedy_path_grows_bits_and_lowers_loss():
    loss = _table()
    labels = list(range(loss.shape[0]))
    problem = search.GroupChoiceProblem(loss.numpy(), np.asarray(BITS), labels, [list(range(len(BITS)))] * 12, 16.0)
    path = [problem.layer_pairs(x[None])[0] for x in search.greedy_path(problem)]
    bits = [np.mean([BITS[i] for i in p]) for p in path]
    losses = [sum(loss[layer, i].item() for layer, i in enumerate(p)) for p in path]
    assert bits[0] == 2.0 and all(b1 > b0 for b0, b1 in zip(bits, bits[1:], strict=False))
    assert all(l1 < l0 for l0, l1 in zip(losses, losses[1:], strict=False))
