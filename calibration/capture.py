"""What the unquantized reference pass sees: each layer's query, key (post-RoPE) and value as
they enter attention, and each decoder layer's input, so any suffix of layers can be rerun."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import simulate
from calibration.errors import CalibrationError
from kvtuner_vllm import format as kvformat


@dataclass
class LayerQKV:
    query: torch.Tensor  # [windows, q_heads, tokens, head_dim], compute dtype, on CPU
    key: torch.Tensor  # [windows, kv_heads, tokens, head_dim]
    value: torch.Tensor
    scaling: float


def unquantized_formats(model) -> list[kvformat.LayerFormat]:
    """Every layer at 16/16: the arithmetic of the served attention without quantization (the reference)."""
    head_size = simulate.attention_modules(model)[0].head_dim
    dtype = next(model.parameters()).dtype
    fmt = kvformat.LayerFormat(16, 16, head_size, head_size, dtype)
    return [fmt] * model.config.num_hidden_layers


def capture_qkv(model, windows: torch.Tensor, block_size: int) -> list[LayerQKV]:
    """Q, K and V of every layer on the windows in the unquantized reference pass."""
    modules = simulate.attention_modules(model)
    stored: dict[int, list[tuple[torch.Tensor, ...]]] = {i: [] for i in range(len(modules))}

    def recorder(layer: int) -> simulate.Recorder:
        return lambda query, key, value: stored[layer].append((query.cpu(), key.cpu(), value.cpu()))

    device = next(model.parameters()).device
    with simulate.served(model, unquantized_formats(model), block_size), \
            simulate.recording(model, {i: recorder(i) for i in range(len(modules))}), torch.inference_mode():
        for window in windows.split(1):
            model.get_decoder()(window.to(device), use_cache=False)
    return [
        LayerQKV(*(torch.cat(parts) for parts in zip(*stored[i], strict=True)), scaling=float(modules[i].scaling))
        for i in range(len(modules))
    ]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer list (model.model.layers in every supported family)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise CalibrationError(f"unsupported architecture {type(model).__name__}: no decoder layer list found")
    return layers


@dataclass
class Replay:
    """Each decoder layer's call (hidden states in, keyword arguments) on a batch, to rerun layers."""

    inputs: list[torch.Tensor]
    kwargs: list[dict]

    def run(self, model, hidden: torch.Tensor, start: int, stop: int, keep=None) -> torch.Tensor:
        """Layers start..stop-1 from `hidden` (with whatever formats are set); keep(layer, output) sees each output."""
        for index in range(start, stop):
            out = decoder_layers(model)[index](hidden, **self.kwargs[index])
            hidden = out[0] if isinstance(out, tuple) else out
            if keep is not None:
                keep(index, hidden)
        return hidden

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.get_decoder().norm(hidden))

    def logits_from(self, model, start: int) -> torch.Tensor:
        """Logits when layers start.. run again from the stored input of `start`."""
        return self.logits(model, self.run(model, self.inputs[start], start, len(self.inputs)))


def capture_replay(model, batch: torch.Tensor, block_size: int) -> Replay:
    """Record every decoder layer's input on one batch in the unquantized reference pass."""
    inputs, kwargs = [], []

    def pre_hook(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with simulate.served(model, unquantized_formats(model), block_size), torch.inference_mode():
            model.get_decoder()(batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Replay(inputs, kwargs)
