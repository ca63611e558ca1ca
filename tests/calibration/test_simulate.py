import pytest
import torch
from tiny_windows import BLOCK
from transformers import AutoModelForCausalLM

from calibration import capture, simulate
from calibration.common import FormatOption, pair
from kvtuner_vllm import reference as kvref

OPTIONS = [
    FormatOption("per-token-group", 32, 0, 0),
    FormatOption("per-token-group", 64, 0, 16),
    FormatOption("kivi", 32, 16, 16),
    FormatOption("kivi", 64, 16, 32),
]


@pytest.fixture(scope="module")
def stock(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


def test_no_format_is_the_stock_model(tiny, stock, windows):
    model, _, _ = tiny
    ids = windows.calibration[:2]
    with torch.inference_mode():
        assert torch.equal(model(ids, use_cache=False).logits, stock(ids, use_cache=False).logits)


def test_unquantized_served_attention_matches_sdpa(tiny, stock, windows):
    """16/16 everywhere: the served arithmetic (float32 attention) computes what SDPA does, so the layout,
    GQA grouping and scaling handed to reference.simulated_attention are the model's."""
    model, _, _ = tiny
    ids = windows.calibration[:2]
    with torch.inference_mode(), simulate.served(model, capture.unquantized_formats(model), BLOCK):
        served = model(ids, use_cache=False).logits
    with torch.inference_mode():
        expected = stock(ids, use_cache=False).logits
    # Two algorithms (SDPA's blocked kernel, the served matmul + softmax) through four layers: no tight a-priori
    # bound, so this is a loose one (~1000 float32 ulps of a logit of 8; measured 1.8e-5 on AMD EPYC). A wrong layout,
    # grouping or scaling moves logits by far more (scaling off by 1%: 0.16).
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)


def test_recorder_sees_exactly_what_enters_the_kv_cache(tiny, stock, windows):
    """K after RoPE and V, per KV head, as the stock model writes them into its cache."""
    model, _, info = tiny
    ids = windows.calibration[:1]
    seen = {}

    def record(layer):
        return lambda query, key, value: seen.__setitem__(layer, (key.clone(), value.clone()))

    with torch.inference_mode():
        cache = stock(ids, use_cache=True).past_key_values
        with simulate.recording(model, {i: record(i) for i in range(info.num_layers)}):
            model(ids, use_cache=False)
    for layer in range(info.num_layers):
        key, value = seen[layer]
        assert key.shape == (1, info.num_kv_heads, ids.shape[1], info.head_dim)
        assert torch.equal(key, cache.layers[layer].keys)
        assert torch.equal(value, cache.layers[layer].values)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.label)
@pytest.mark.parametrize("bits", [(4, 2), (2, 4), (8, 8)], ids=str)
def test_served_layer_computes_format_simulated_attention(tiny, windows, option, bits):
    """The attention output of a served layer (what o_proj reads) is reference.simulated_attention of the layer's
    own query/key/value, every other layer untouched."""
    model, _, info = tiny
    ids = windows.calibration[:2]
    fmt = option.layer_format(pair(*bits), info.head_dim, torch.float32)
    module = simulate.attention_modules(model)[1]
    seen, outputs = {}, {}

    def record(query, key, value):
        seen.update(query=query.clone(), key=key.clone(), value=value.clone())

    handle = module.o_proj.register_forward_pre_hook(lambda _, args: outputs.__setitem__("o_proj", args[0].clone()))
    try:
        with torch.inference_mode():
            base = model(ids, use_cache=False, output_hidden_states=True).hidden_states
            with simulate.served(model, {1: fmt}, BLOCK), simulate.recording(model, {1: record}):
                quantized = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    expected = kvref.simulated_attention(seen["query"], seen["key"], seen["value"], fmt, BLOCK, module.scaling)
    assert torch.equal(outputs["o_proj"], expected.transpose(1, 2).reshape(outputs["o_proj"].shape))
    assert torch.equal(quantized[1], base[1])  # layer 0 is untouched
    assert not torch.equal(quantized[2], base[2])  # layer 1 is quantized


def test_formats_are_removed_after_the_block(tiny, windows):
    model, _, info = tiny
    fmt = OPTIONS[0].layer_format(pair(2, 2), info.head_dim, torch.float32)
    with simulate.served(model, [fmt] * info.num_layers, BLOCK):
        pass
    assert not any(hasattr(m, simulate.FORMAT_ATTR) for m in simulate.attention_modules(model))
