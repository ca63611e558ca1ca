import itertools

import numpy as np
import pytest

from calibration import dp


def brute_force_front(loss: np.ndarray, cost: list[int]) -> list[tuple[int, float]]:
    """Every choice enumerated: the lowest loss at each total cost, then the strictly improving ones."""
    best: dict[int, float] = {}
    for choice in itertools.product(range(loss.shape[1]), repeat=loss.shape[0]):
        value = sum(loss[layer, p] for layer, p in enumerate(choice))
        if np.isfinite(value):
            total = sum(cost[p] for p in choice)
            best[total] = min(best.get(total, np.inf), value)
    front, lowest = [], np.inf
    for total in sorted(best):
        if best[total] < lowest:
            lowest = best[total]
            front.append((total, best[total]))
    return front


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("layers,pairs", [(1, 3), (3, 4), (5, 5)])
def test_exact_front_equals_brute_force(seed, layers, pairs):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 6, size=pairs).tolist()  # ties and zero costs included
    loss = rng.random((layers, pairs)).round(2)  # ties in loss too
    loss[rng.random((layers, pairs)) < 0.2] = np.inf  # pairs a layer may not use
    loss[:, 0] = rng.random(layers)  # every layer keeps at least one allowed pair
    front = dp.exact_front(loss, cost)
    expected = brute_force_front(loss, cost)
    assert [p.cost for p in front] == [c for c, _ in expected]
    # Each side adds `layers` losses in [0, 1) in its own order: float64 sums that differ by at most
    # 2 (layers - 1) u layers < layers^2 eps (u = eps / 2, the recursive summation bound)
    slack = layers * layers * np.finfo(np.float64).eps
    np.testing.assert_allclose([p.loss for p in front], [v for _, v in expected], rtol=0, atol=slack)
    for point in front:  # each point's choice has the cost and loss it claims
        assert sum(cost[p] for p in point.layers) == point.cost
        assert sum(loss[layer, p] for layer, p in enumerate(point.layers)) == pytest.approx(point.loss, abs=slack)


def test_best_within_picks_the_lowest_loss_under_the_cap():
    loss = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 5.0]])
    cost = [8, 4, 2]  # per layer: 8 bits lossless, 4 bits, 2 bits
    front = dp.exact_front(loss, cost)
    # totals 4: 2+2 bits (3+5); 6: 2+4 (3+2); 8: 4+4 (1+2); 10: 2+8 (3+0) is no better; 12: 4+8 (1+0); 16: 8+8
    assert [(p.cost, p.loss) for p in front] == [(4, 8.0), (6, 5.0), (8, 3.0), (12, 1.0), (16, 0.0)]
    assert dp.best_within(front, 9).cost == 8 and dp.best_within(front, 9).layers == (1, 1)
    assert dp.best_within(front, 3) is None
    assert dp.best_within(front, 100).loss == 0.0 and dp.best_within(front, 100).cost == 16
