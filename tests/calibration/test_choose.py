import numpy as np
import pytest

from calibration import choose
from calibration.choose import Scored
from calibration.common import SEARCH_PAIRS, Candidate, FormatOption, pair
from calibration.evaluate import Scores

OPTION = FormatOption("kivi", 32, 32, 32)
KV8, KV4, K4V2, KV2 = (SEARCH_PAIRS.index(pair(*b)) for b in [(8, 8), (4, 4), (4, 2), (2, 2)])


def scored(layers, calibration_kl, selection_kl=None, option=OPTION) -> Scored:
    s = Scored(Candidate(option, tuple(layers)), Scores(calibration_kl, 2.0), surrogate=calibration_kl)
    if selection_kl is not None:
        s.selection = Scores(selection_kl, 2.0 + selection_kl)
    return s


def test_pool_takes_the_best_front_maps_within_the_budget_and_rules_out_bad_uniform_maps():
    front = [scored([KV4, K4V2], 0.3), scored([KV4, KV4, KV4, K4V2], 0.2), scored([KV8, KV4], 0.1),
             scored([KV4, K4V2, K4V2, KV4], 0.25)]
    uniform = [scored([KV4] * 2, 0.2), scored([K4V2] * 2, 0.5), scored([KV2] * 2, 1.5), scored([KV8] * 2, 0.01)]
    pool = choose.build_pool(front, uniform, budget=4.0, verify=2)
    # KV8+KV4 (6 bits) and uniform KV8 exceed the budget; of the rest the two lowest calibration KL
    assert [s.calibration.kl for s in pool.front] == [0.2, 0.25]
    # K4V2 (0.5) and KV2 (1.5) have over twice the calibration KL of uniform KV4 (0.2): not scored
    assert [s.candidate.pairs[0].label for s in pool.uniform] == ["KV4"]
    assert [(u.candidate.pairs[0].label, b.candidate.pairs[0].label) for u, b in pool.ruled_out] == [
        ("K4V2", "KV4"), ("KV2", "KV4")]


def test_front_maps_that_cannot_win_are_not_scored():
    front = [scored([KV4, K4V2], 0.1), scored([KV4, KV2], 0.15), scored([K4V2, KV2], 0.25)]
    pool = choose.build_pool(front, [scored([K4V2] * 2, 0.18)], budget=4.0, verify=3)
    assert [s.calibration.kl for s in pool.front] == [0.1, 0.15]  # 0.25 is over twice the lowest (0.1)
    assert [u.calibration.kl for u in pool.uniform] == [0.18]


def test_uniform_maps_within_twice_the_best_are_all_scored():
    uniform = [scored([KV4] * 2, 0.35), scored([K4V2] * 2, 0.3), scored([KV2] * 2, 0.61)]
    pool = choose.build_pool([], uniform, budget=4.0, verify=3)
    assert [u.candidate.pairs[0].label for u in pool.uniform] == ["KV4", "K4V2"]
    assert [(u.candidate.pairs[0].label, b.candidate.pairs[0].label) for u, b in pool.ruled_out] == [("KV2", "K4V2")]


@pytest.mark.parametrize("seed", range(20))
def test_the_choice_is_never_worse_than_a_uniform_map_with_no_more_bits(seed):
    rng = np.random.default_rng(seed)
    pairs = [KV8, KV4, K4V2, KV2]
    front = [scored(rng.choice(pairs, size=4), rng.random()) for _ in range(8)]
    uniform = [scored([p] * 4, rng.random()) for p in pairs]
    pool = choose.build_pool(front, uniform, budget=float(rng.choice([3.0, 3.5, 4.0, 5.0])), verify=4)
    for member in pool.members:
        member.selection = Scores(float(rng.random()), 2.0)
    chosen = choose.choose(pool)
    assert chosen.candidate.avg_bits <= max(m.candidate.avg_bits for m in pool.members)
    for u in pool.uniform:
        if u.candidate.avg_bits <= chosen.candidate.avg_bits:
            assert chosen.selection.kl <= u.selection.kl
    baseline = choose.best_uniform(pool.members, lambda c: c.avg_bits <= chosen.candidate.avg_bits)
    assert baseline is None or chosen.selection.kl <= baseline.selection.kl


def test_best_uniform_is_the_lowest_selection_kl_that_fits():
    """Maps that are not uniform or do not fit are never the baseline, whatever their KL; ties go to fewer bits."""
    per_token = FormatOption("per-token-group", 64, 0, 32)
    maps = [scored([KV4, K4V2], 0.1, 0.01), scored([KV8] * 2, 0.1, 0.02), scored([KV4] * 2, 0.1, 0.3),
            scored([K4V2] * 2, 0.1, 0.2, per_token), scored([KV2] * 2, 0.1, 0.2)]
    best = choose.best_uniform(maps, lambda c: c.avg_bits <= 4.0)
    assert best.candidate == Candidate(OPTION, (KV2, KV2))  # K4V2 per-token ties at 0.2 with more bits
    only_per_token = choose.best_uniform(maps, lambda c: c.option == per_token)
    assert only_per_token.candidate.option == per_token
    assert choose.best_uniform(maps, lambda c: c.avg_bits < 2.0) is None
