import torch

from calibration import capture, sensitivity
from calibration.common import SEARCH_PAIRS, pair

KV16, KV8, KV4, KV2 = pair(16, 16), pair(8, 8), pair(4, 4), pair(2, 2)


def test_attention_error_orders_bit_widths_on_every_layer(tiny, windows):
    model, _, info = tiny
    captured = capture.capture_qkv(model, windows.calibration, batch_size=2)
    assert len(captured) == info.num_layers
    assert captured[0].key.shape == (windows.calibration.shape[0], info.num_kv_heads, windows.calibration.shape[1], 64)
    errors = sensitivity.attention_error(captured, [KV16, KV8, KV4, KV2], 64)
    assert errors.shape == (info.num_layers, 4)
    assert (errors[:, 0] == 0).all()
    assert (errors[:, 1] < errors[:, 2]).all() and (errors[:, 2] < errors[:, 3]).all()


def test_kl_sensitivity_per_layer(tiny, windows):
    model, _, info = tiny
    replay = capture.capture_replay(model, windows.calibration[:2])
    with torch.inference_mode():
        assert torch.equal(replay.logits_from(model, 0), model(windows.calibration[:2], use_cache=False).logits)
    only = [[0, 1, 2]] * (info.num_layers - 1) + [[2]]
    table = sensitivity.kl_sensitivity(model, replay, [KV16, KV8, KV2], 64, only=only)
    assert (table[:, 0][:-1] == 0).all()
    assert (table[:-1, 2] > table[:-1, 1]).all()  # KV2 hurts more than KV8 on every layer
    assert table[-1, :2].isnan().all() and table[-1, 2] > 0  # unmeasured pairs stay NaN


def test_kl_divergence_is_zero_for_equal_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(sensitivity.kl_divergence(logits, logits), torch.zeros(2, 5), atol=1e-6)
    assert (sensitivity.kl_divergence(logits, logits.flip(-1)) > 0).all()


def test_search_pairs_are_the_papers():
    labels = [p.label for p in SEARCH_PAIRS]
    assert labels == ["KV16", "KV8", "K8V4", "K4V8", "KV4", "K8V2", "K4V2", "K2V4", "KV2"]
