import torch

from calibration import clustering


def test_identical_profiles_share_a_group():
    a, b, c = [1e-4, 1e-3, 1e-2], [1e-2, 1e-1, 1.0], [1e-5, 1e-2, 1e-1]
    table = torch.tensor([a, b, a, c, b, a], dtype=torch.float64)
    labels = clustering.cluster_layers(table, 3)
    assert labels == [0, 1, 0, 2, 1, 0]


def test_one_group_and_one_layer():
    table = torch.rand(4, 3)
    assert clustering.cluster_layers(table, 1) == [0, 0, 0, 0]
    assert clustering.cluster_layers(table[:1], 5) == [0]


def test_group_candidates_are_the_pareto_set_of_the_summed_error():
    bits = [8, 6, 4, 2]
    table = torch.tensor([[0.0, 0.1, 0.2, 0.9], [0.0, 0.3, 0.2, 0.9]], dtype=torch.float64)
    kept = [[0, 1, 2, 3], [0, 2, 3]]
    # summed: 8->0.0, 6->0.4, 4->0.4, 2->1.8: 6 bits is dominated by 4 bits
    assert clustering.group_candidates(table, [0, 0], kept, bits) == [[0, 2, 3]]


def test_profile_table_uses_the_kl_measured_everywhere():
    nan = float("nan")
    kl = torch.tensor([[0.0, 0.1, nan, 0.3], [0.0, 0.2, 0.25, 0.5]], dtype=torch.float64)
    attention = torch.rand(2, 4, dtype=torch.float64)
    assert torch.equal(clustering.profile_table(kl, attention), kl[:, [1, 3]])
    assert torch.equal(clustering.profile_table(kl[:, :3], attention), attention[:, 1:])  # one column only
