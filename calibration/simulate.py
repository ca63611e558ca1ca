"""Running a Hugging Face model with the served KV cache: every layer's attention is
`kvtuner_vllm.reference.simulated_attention`, the format's own definition of what the server
computes for whole sequences (window rule, kivi key groups, block size), prefill included.

How: transformers routes every Llama/Qwen2/Qwen3/Mistral attention through
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)`
with key/value shaped [batch, kv_heads, tokens, head_dim] exactly as they enter the KV cache
(post-RoPE, before the GQA repeat). We register one implementation, KVTUNER_ATTENTION: a layer
with a `LayerFormat` set runs simulated_attention on (query, key, value); a layer with a
recorder set hands the tensors to it (capture); any other layer runs stock SDPA. No copy of a
modeling file, no monkey-patching of RoPE, whose call sites differ across families.

The inputs are whole unpadded windows from position 0 (calibration never pads), so the causal
rule inside simulated_attention is the model's mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from calibration.errors import CalibrationError
from kvtuner_vllm import format as kvformat
from kvtuner_vllm import reference as kvref

KVTUNER_ATTENTION = "kvtuner_simulated"
FORMAT_ATTR = "_kvtuner_format"  # (LayerFormat, block_size) of the layer, or absent
RECORDER_ATTR = "_kvtuner_recorder"

# recorder(query, key, value): sees the tensors as they enter attention, [batch, heads, tokens, head_dim].
Recorder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    recorder = getattr(module, RECORDER_ATTR, None)
    if recorder is not None:
        recorder(query, key, value)
    served = getattr(module, FORMAT_ATTR, None)
    if served is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    fmt, block_size = served
    _check_window(module, key.shape[-2])
    softcap = getattr(module.config, "attn_logit_softcapping", None)
    out = kvref.simulated_attention(query, key, value, fmt, block_size, scaling, softcap)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _check_window(module, tokens: int) -> None:
    window = getattr(module, "sliding_window", None)
    if window and tokens > window:
        raise CalibrationError(f"layer {module.layer_idx} uses a sliding window of {window} positions, shorter than "
                               f"the calibration windows ({tokens}): lower --seq-len to {window}")


AttentionInterface.register(KVTUNER_ATTENTION, _attention)
# Same masks as SDPA, so a layer without a format computes exactly what the stock model does.
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
    """Route the model's attention through KVTUNER_ATTENTION (no format set: identical to SDPA)."""
    model.set_attn_implementation(KVTUNER_ATTENTION)
    return attention_modules(model)


@contextlib.contextmanager
def _attributes(model: torch.nn.Module, name: str, per_layer: Mapping[int, object]) -> Iterator[None]:
    modules = attention_modules(model)
    try:
        for layer, value in per_layer.items():
            setattr(modules[layer], name, value)
        yield
    finally:
        for module in modules:
            if hasattr(module, name):
                delattr(module, name)


def served(model: torch.nn.Module, formats: Mapping[int, kvformat.LayerFormat] | list[kvformat.LayerFormat],
           block_size: int):
    """Context: the given layers ({layer: format} or a full list) attend as the server does with that format;
    layers not given run stock SDPA."""
    items = formats.items() if isinstance(formats, Mapping) else enumerate(formats)
    return _attributes(model, FORMAT_ATTR, {layer: (fmt, block_size) for layer, fmt in items})


def recording(model: torch.nn.Module, recorders: Mapping[int, Recorder]):
    """Context: each given layer's recorder sees its (query, key, value) on every forward."""
    return _attributes(model, RECORDER_ATTR, recorders)
