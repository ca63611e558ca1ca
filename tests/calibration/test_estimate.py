"""`show-map --model`'s measurement (calibration.estimate) and the bfloat16 products that make the
calibration's forward passes fast (calibration.model.lower_matmuls), on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from calibration import data, estimate, simulate
from calibration import model as model_io
from calibration.common import SEARCH_PAIRS, Candidate, FormatOption
from calibration.evaluate import Evaluator, ScoreStore
from kvtuner_vllm.precision_map import PrecisionMap

PER_TOKEN = {"format": "kvtuner-precision-map/v2", "residual_length": 16}


def _uniform(k: int, v: int, **options) -> PrecisionMap:
    return PrecisionMap.uniform(4, k, v, 32, **(options or PER_TOKEN))


@pytest.fixture(scope="module")
def measured(tiny_dir):
    return estimate.measure(_uniform(4, 2), tiny_dir, tokens=256, threads=1)


def test_the_measurement_is_the_calibration_score_of_the_same_map(measured, tiny_dir):
    """measure() scores exactly what the calibration's Evaluator scores for the same map, text and products."""
    model, tokenizer, info = model_io.load(tiny_dir, "cpu", "float32", "auto")
    assert info.matmul_dtype == torch.bfloat16  # the tiny checkpoint is bf16: the auto products
    windows = data.split_tokens(tokenizer, data.default_text(), estimate.SEQ_LEN, estimate.SEQ_LEN, 256,
                                estimate.SEQ_LEN, 0).report
    evaluator = Evaluator(model, windows, estimate.BLOCK_SIZE, 2, ScoreStore(None), torch.float32, 0)
    option = FormatOption("per-token-group", 32, 0, 16)
    candidate = Candidate(option, (SEARCH_PAIRS.index(_uniform(4, 2).layers[0]),) * 4)
    assert estimate.MapUnderTest.of(_uniform(4, 2)).key == candidate.key  # one score store serves both
    scores = evaluator.score(candidate)
    assert measured["map"]["kl"] == scores.kl > 0
    assert measured["map"]["ppl_delta_pct"] == pytest.approx(100 * (scores.ppl / evaluator.unquantized.ppl - 1))
    assert measured["tokens"] == windows[:, 1:].numel() == 255
    assert measured["map"]["bytes_per_token"] == 2 * sum(
        f.bytes_per_token for f in _uniform(4, 2).layer_formats(64, torch.bfloat16))


def test_a_per_token_map_is_also_measured_with_kivi_keys(measured, tiny_dir):
    assert measured["kivi"]["format"] == estimate.KIVI.label
    kivi = _uniform(4, 2, format="kvtuner-precision-map/v2", scheme="kivi", key_group_size=32, residual_length=64)
    again = estimate.measure(kivi.model_copy(update={"group_size": 32}), tiny_dir, tokens=256, threads=1)
    assert "kivi" not in again
    assert again["map"]["kl"] == measured["kivi"]["kl"]  # the alternative is exactly that kivi map


def test_an_unquantized_map_measures_zero(tiny_dir):
    measured = estimate.measure(_uniform(16, 16), tiny_dir, tokens=256, threads=1)
    assert measured["map"]["kl"] == 0.0 and measured["map"]["ppl_delta_pct"] == 0.0


def test_lower_matmuls_replaces_the_decoder_products_only(tiny_dir):
    model, _, info = model_io.load(tiny_dir, "cpu", "float32")
    x = torch.randn(3, 5, 256)
    layer0 = model.model.layers[0].self_attn.q_proj
    expected = torch.nn.functional.linear(x.bfloat16(), layer0.weight.bfloat16()).float()
    assert model_io.lower_matmuls(model, torch.bfloat16) == 7 * info.num_layers  # q k v o gate up down
    lowered = model.model.layers[0].self_attn.q_proj
    assert isinstance(lowered, model_io.LowPrecisionLinear)
    assert torch.equal(lowered(x), expected) and lowered(x).dtype == torch.float32
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    simulate.attention_modules(model)  # the attention modules are still found
    with model_io.exact_products(model):  # the tiny checkpoint is bf16: its weights widen exactly
        assert torch.equal(lowered(x), torch.nn.functional.linear(x, layer0.weight))
    assert torch.equal(lowered(x), expected)  # fast again after the context


@pytest.mark.parametrize(("checkpoint", "compute", "wanted", "expected"), [
    (torch.bfloat16, torch.float32, "auto", torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, "auto", None),  # already bf16: nothing to lower
    (torch.float16, torch.float32, "auto", None),  # fp16 weights are not exact in bf16
    (torch.float16, torch.float32, "bfloat16", torch.bfloat16),  # asked for
    (torch.bfloat16, torch.float32, "float32", None),
])
def test_matmul_dtype(checkpoint, compute, wanted, expected):
    info = model_io.ModelInfo("m", 4, 2, 64, checkpoint, compute)
    assert model_io.matmul_dtype(wanted, info) == expected
