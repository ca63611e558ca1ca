"""Simulating the served KV cache inside a Hugging Face model.

The server quantizes each step's K and V before attention, and every query attends over the
packed cache, its own tokens included (kvtuner_vllm/format.py, "Attention semantics"). The
faithful simulation is therefore: in every layer, replace K (after RoPE and any k_norm) and V
by `format.fake_quantize` right before the attention kernel.

How: transformers routes every Llama/Qwen2/Qwen3/Mistral attention through
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)`
with key/value shaped [batch, kv_heads, tokens, head_dim] exactly as they enter the KV cache
(post-RoPE, before the GQA repeat). We register one extra implementation, KVTUNER_ATTENTION,
which applies the module's current `KVHook` to (query, key, value) and then calls stock SDPA.
This needs no copy of any modeling file and no monkey-patching of `apply_rotary_pos_emb`, whose
call sites differ across families; the same registration also serves capture (the hook records
instead of transforming).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from calibration.common import CalibrationError
from kvtuner_vllm import format as kvformat
from kvtuner_vllm.precision_map import LayerPrecision

KVTUNER_ATTENTION = "kvtuner_fake_quant"
HOOK_ATTR = "_kvtuner_hook"

# hook(query, key, value) -> (key, value); tensors are [batch, heads, tokens, head_dim].
KVHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _attention(module, query, key, value, attention_mask, **kwargs):
    hook = getattr(module, HOOK_ATTR, None)
    if hook is not None:
        key, value = hook(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KVTUNER_ATTENTION, _attention)
# Same masks as SDPA, so the patched model with no hook computes exactly what the stock one does.
AttentionMaskInterface.register(KVTUNER_ATTENTION, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order (by `layer_idx`)."""
    found = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int):
            found[module.layer_idx] = module
    num_layers = model.config.num_hidden_layers
    if sorted(found) != list(range(num_layers)):
        raise CalibrationError(
            f"unsupported architecture {type(model).__name__}: expected one attention module with a layer_idx "
            f"per decoder layer ({num_layers}), found {len(found)}; supported: Llama, Qwen2, Qwen3, Mistral families"
        )
    return [found[i] for i in range(num_layers)]


def install(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Route the model's attention through KVTUNER_ATTENTION (no hook set: identical to SDPA)."""
    model.set_attn_implementation(KVTUNER_ATTENTION)
    return attention_modules(model)


@contextlib.contextmanager
def hooks(model: torch.nn.Module, per_layer: dict[int, KVHook]) -> Iterator[None]:
    """Set per-layer hooks for the duration of the block (other layers run unquantized)."""
    modules = attention_modules(model)
    try:
        for layer, hook in per_layer.items():
            setattr(modules[layer], HOOK_ATTR, hook)
        yield
    finally:
        for module in modules:
            if hasattr(module, HOOK_ATTR):
                delattr(module, HOOK_ATTR)


def fake_quant_hook(precision: LayerPrecision, group_size: int) -> KVHook:
    """K and V as the server stores and reads them back (identity at 16 bits)."""

    def hook(query, key, value):
        return (
            kvformat.fake_quantize(key, precision.key_bits, group_size),
            kvformat.fake_quantize(value, precision.value_bits, group_size),
        )

    return hook


def quantized(model: torch.nn.Module, layers: Sequence[LayerPrecision] | dict[int, LayerPrecision], group_size: int):
    """Context: the model runs with a served KV cache of these per-layer precisions.

    `layers` is a full per-layer list, or {layer: precision} to quantize only those layers.
    """
    items = layers.items() if isinstance(layers, dict) else enumerate(layers)
    return hooks(
        model,
        {i: fake_quant_hook(p, group_size) for i, p in items if (p.key_bits, p.value_bits) != (16, 16)},
    )
