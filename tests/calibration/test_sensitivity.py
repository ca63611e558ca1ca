import numpy as np
import pytest
import torch
from conftest import BLOCK

from calibration import capture, sensitivity
from calibration.common import SEARCH_PAIRS, FormatOption, pair
from kvtuner_vllm import format as kvformat

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


@pytest.mark.parametrize("stride", [1, 3])
def test_served_rows_are_rows_of_simulated_attention(measured, stride):
    captured, _, _ = measured
    qkv = captured[1]
    fmt = OPTIONS[3].layer_format(pair(2, 4), qkv.key.shape[-1], qkv.key.dtype)
    positions = torch.arange(stride - 1, qkv.key.shape[-2], stride)
    full = kvformat.simulated_attention(qkv.query, qkv.key, qkv.value, fmt, BLOCK, qkv.scaling)
    torch.testing.assert_close(sensitivity.served_rows(qkv, fmt, BLOCK, positions), full[:, :, positions],
                               rtol=1e-5, atol=1e-6)


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
        np.testing.assert_allclose(table[:, SEARCH_PAIRS.index(pair(4, 2))], surrogate.scale * (k + v), rtol=1e-12)
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
    np.testing.assert_allclose(kl, surrogate.reference_kl, rtol=0, atol=0)
    predicted = surrogate.table(surrogate.reference_option)[:, SEARCH_PAIRS.index(sensitivity.REFERENCE_PAIR)]
    np.testing.assert_allclose(predicted, kl, rtol=1e-9)


def test_unquantized_single_layer_kl_is_zero(tiny, measured):
    model, _, info = tiny
    _, replay, _ = measured
    assert (sensitivity.single_layer_kl(model, replay, capture.unquantized_formats(model), BLOCK) == 0).all()
