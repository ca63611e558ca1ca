import numpy as np
import pytest
import torch
from tiny_windows import BLOCK

from calibration import capture, sensitivity
from calibration.common import SEARCH_PAIRS, FormatOption, pair
from kvtuner_vllm import reference as kvref

OPTIONS = [
    FormatOption("per-token-group", 32, 0, 0),
    FormatOption("per-token-group", 32, 0, 16),
    FormatOption("per-token-group", 64, 0, 16),
    FormatOption("kivi", 32, 16, 16),
]


@pytest.fixture(scope="module")
def measured(tiny, windows):
    model, _, _ = tiny
    ids = windows.calibration[:1]
    captured = capture.capture_qkv(model, ids, BLOCK)
    replay = capture.capture_replay(model, ids, BLOCK)
    return captured, replay, sensitivity.measure(model, captured, replay, OPTIONS, BLOCK)


def _rounding_bound(qkv, fmt, positions: torch.Tensor) -> torch.Tensor:
    """How far two float32 computations of the same attention rows can differ when their matmuls are blocked
    differently (a different number of query rows): [windows, q_heads, positions, head_dim]. Both computations
    err by at most: scores, dot products of D terms, gamma_D sum|q k| each (so their softmax, |dp|_1 <= e^(2 dS) - 1);
    the softmax's own rounding ((L + 2) u per probability, L keys); the two products with V and V-hat and their sum,
    (2 L + 1) u max|v| (u = eps / 2; Higham, Accuracy and Stability of Numerical Algorithms, 3.1 and 4.2)."""
    u = torch.finfo(torch.float32).eps / 2
    length, size = qkv.key.shape[-2:]
    groups = qkv.query.shape[1] // qkv.key.shape[1]
    key_hat = kvref.fake_quantize_keys(qkv.key, fmt)
    value_hat = kvref.fake_quantize(qkv.value, fmt.value_bits, fmt.group_size)
    keys = torch.maximum(qkv.key.abs(), key_hat.abs()).float().repeat_interleave(groups, dim=1)
    values = torch.maximum(qkv.value.abs(), value_hat.abs()).float().repeat_interleave(groups, dim=1)
    magnitude = (qkv.query[:, :, positions].abs().float() @ keys.transpose(-1, -2)).amax(-1, keepdim=True)
    score_error = 2 * size * u * qkv.scaling * magnitude  # both computations
    probability_error = torch.expm1(2 * score_error) + 2 * (length + 2) * u
    return values.amax(-2, keepdim=True) * (probability_error + 2 * (2 * length + 1) * u)


@pytest.mark.parametrize("stride", [1, 3])
def test_served_rows_are_rows_of_simulated_attention(measured, stride):
    """Same rule, rows computed with a different number of queries: equal up to _rounding_bound (5e-4 of the
    largest output here). By experiment, comparing against the rows of the next positions instead (an off-by-one)
    exceeds the bound on 99.8% of the elements, by up to 4500x."""
    captured, _, _ = measured
    qkv = captured[1]
    fmt = OPTIONS[3].layer_format(pair(2, 4), qkv.key.shape[-1], qkv.key.dtype)
    positions = torch.arange(stride - 1, qkv.key.shape[-2], stride)
    full = kvref.simulated_attention(qkv.query, qkv.key, qkv.value, fmt, BLOCK, qkv.scaling)
    difference = (sensitivity.served_rows(qkv, fmt, BLOCK, positions) - full[:, :, positions]).abs()
    assert (difference <= _rounding_bound(qkv, fmt, positions)).all()


def test_errors_fall_with_bits_and_with_the_window(measured):
    _, _, surrogate = measured
    k, v = surrogate.key_error, surrogate.value_error  # [layers, configs, bits 2/4/8]
    assert (k[:, :, 0] > k[:, :, 1]).all() and (k[:, :, 1] > k[:, :, 2]).all()
    assert (v[:, :, 0] > v[:, :, 1]).all() and (v[:, :, 1] > v[:, :, 2]).all()
    no_window = surrogate.key_configs.index(sensitivity.key_config(OPTIONS[0]))
    window = surrogate.key_configs.index(sensitivity.key_config(OPTIONS[1]))
    assert (k[:, window] < k[:, no_window]).all()  # recent keys read in full precision: less error


def test_table_is_scale_times_summed_k_and_v_error(measured):
    _, _, surrogate = measured
    for option in OPTIONS:
        table = surrogate.table(option)
        assert (table[:, SEARCH_PAIRS.index(pair(16, 16))] == 0).all()
        k = surrogate.key_error[:, surrogate.key_configs.index(sensitivity.key_config(option)), 1]
        v = surrogate.value_error[:, surrogate.value_configs.index(sensitivity.value_config(option)), 0]
        # exact: the table computes scale * (0 + k + v) in float64, the same roundings
        np.testing.assert_array_equal(table[:, SEARCH_PAIRS.index(pair(4, 2))], surrogate.scale * (k + v))
        layers = [SEARCH_PAIRS.index(pair(4, 4))] * len(table)
        assert surrogate.predict(option, layers) == pytest.approx(table[:, layers[0]].sum())


def test_scale_reproduces_the_measured_single_layer_kl(tiny, measured):
    """a_l is fit so that the reference pair's predicted KL is the measured one, on every layer."""
    model, _, info = tiny
    _, replay, surrogate = measured
    assert surrogate.reference_option == max(
        OPTIONS, key=lambda o: surrogate.squared_error(o)[:, SEARCH_PAIRS.index(pair(4, 4))].mean())
    fmt = surrogate.reference_option.layer_format(sensitivity.REFERENCE_PAIR, info.head_dim, torch.float32)
    kl = sensitivity.single_layer_kl(model, replay, [fmt] * info.num_layers, BLOCK)
    assert (kl > 0).all()
    np.testing.assert_array_equal(kl, surrogate.reference_kl)  # exact: the same computation on the same inputs
    predicted = surrogate.table(surrogate.reference_option)[:, SEARCH_PAIRS.index(sensitivity.REFERENCE_PAIR)]
    # predicted = (kl / e) * e in float64: two roundings of at most u = eps / 2 each
    np.testing.assert_allclose(predicted, kl, rtol=np.finfo(np.float64).eps, atol=0)


def test_unquantized_single_layer_kl_is_zero(tiny, measured):
    model, _, info = tiny
    _, replay, _ = measured
    assert (sensitivity.single_layer_kl(model, replay, capture.unquantized_formats(model), BLOCK) == 0).all()
