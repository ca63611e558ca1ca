import numpy as np

from calibration import pruning


def test_keeps_exactly_the_non_dominated_pairs():
    bits = [8, 6, 6, 4, 3, 3, 2]
    errors = [0.01, 0.05, 0.02, 0.03, 0.2, 0.1, 0.5]
    # 6 bits @0.05 is dominated by 6 bits @0.02; 4 bits @0.03 survives (fewer bits than 6 @0.02);
    # 3 bits @0.2 is dominated by 3 bits @0.1
    assert pruning.pareto_indices(bits, errors) == [0, 2, 3, 5, 6]


def test_more_bits_with_more_error_is_dropped_and_ties_keep_the_first():
    assert pruning.pareto_indices([8, 4, 4], [0.3, 0.2, 0.2]) == [1]


def test_allowed_pairs_is_the_union_over_options():
    costs = [16, 8, 4]
    first = np.array([[0.0, 0.1, 0.4], [0.0, 0.5, 0.4]])  # layer 1: 8 bits worse than 4 bits
    second = np.array([[0.0, 0.1, 0.05], [0.0, 0.5, 0.4]])  # layer 0: 8 bits worse than 4 bits
    assert pruning.allowed_pairs([first], costs).tolist() == [[True, True, True], [True, False, True]]
    assert pruning.allowed_pairs([second], costs).tolist() == [[True, False, True], [True, False, True]]
    assert pruning.allowed_pairs([first, second], costs).tolist() == [[True, True, True], [True, False, True]]
