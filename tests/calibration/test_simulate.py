import torch
from transformers import AutoModelForCausalLM

from calibration import simulate
from calibration.common import pair
from kvtuner_vllm import format as kvformat


def test_all_16_bits_is_the_stock_model(tiny, tiny_dir, windows):
    model, _, info = tiny
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = windows.calibration[:2]
    with torch.inference_mode():
        expected = stock(ids).logits
        with simulate.quantized(model, [pair(16, 16)] * info.num_layers, 64):
            assert torch.equal(model(ids, use_cache=False).logits, expected)
        assert torch.equal(model(ids, use_cache=False).logits, expected)  # no hooks left behind


def test_hook_sees_exactly_what_enters_the_kv_cache(tiny, tiny_dir, windows):
    """K after RoPE and V, per KV head, as the stock model writes them into its cache."""
    model, _, info = tiny
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = windows.calibration[:1]
    seen = {}

    def record(layer):
        def hook(query, key, value):
            seen[layer] = (key.clone(), value.clone())
            return key, value

        return hook

    with torch.inference_mode():
        cache = stock(ids, use_cache=True).past_key_values
        with simulate.hooks(model, {i: record(i) for i in range(info.num_layers)}):
            model(ids, use_cache=False)
    for layer in range(info.num_layers):
        key, value = seen[layer]
        assert key.shape == (1, info.num_kv_heads, ids.shape[1], info.head_dim)
        assert torch.equal(key, cache.layers[layer].keys)
        assert torch.equal(value, cache.layers[layer].values)


def test_quantized_applies_the_served_quantizer_to_the_chosen_layers_only(tiny, windows):
    model, _, info = tiny
    ids = windows.calibration[:1]

    def manual(query, key, value):
        return kvformat.fake_quantize(key, 2, 64), kvformat.fake_quantize(value, 2, 64)

    with torch.inference_mode():
        base = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        with simulate.quantized(model, {1: pair(2, 2)}, 64):
            quantized = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        with simulate.hooks(model, {1: manual}):
            expected = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    assert torch.equal(quantized[1], base[1])  # layer 0 is untouched
    assert not torch.equal(quantized[2], base[2])  # layer 1 is quantized ...
    # ... with format.fake_quantize, exactly
    assert all(torch.equal(q, e) for q, e in zip(quantized, expected, strict=True))
