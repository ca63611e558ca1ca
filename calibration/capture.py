"""Step 1: what enters each layer's KV cache (K, V) and the queries that read it, plus the
decoder layers' inputs for replaying the model from any layer on (sensitivity's KL pass)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from calibration import simulate
from calibration.errors import CalibrationError


@dataclass
class LayerQKV:
    query: torch.Tensor  # [windows, q_heads, tokens, head_dim], model dtype, on CPU
    key: torch.Tensor  # [windows, kv_heads, tokens, head_dim]
    value: torch.Tensor
    scaling: float


def capture_qkv(model, windows: torch.Tensor, batch_size: int = 4) -> list[LayerQKV]:
    """Q, K (post-RoPE) and V of every layer on the calibration windows, as the cache would see them."""
    modules = simulate.attention_modules(model)
    stored: dict[int, list[tuple[torch.Tensor, ...]]] = {i: [] for i in range(len(modules))}

    def recorder(layer: int) -> simulate.KVHook:
        def hook(query, key, value):
            stored[layer].append((query.cpu(), key.cpu(), value.cpu()))
            return key, value

        return hook

    device = next(model.parameters()).device
    with simulate.hooks(model, {i: recorder(i) for i in range(len(modules))}), torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc="capture K/V/Q", unit="batch", leave=False):
            model.get_decoder()(batch.to(device), use_cache=False)
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
    """Each decoder layer's call (hidden states in, keyword arguments) on a batch, to rerun layers l..L-1."""

    inputs: list[torch.Tensor]
    kwargs: list[dict]

    def logits_from(self, model, start: int) -> torch.Tensor:
        """Logits when layers start.. run again (with whatever hooks are set) from the stored input of `start`."""
        hidden = self.inputs[start]
        for layer, kwargs in zip(decoder_layers(model)[start:], self.kwargs[start:], strict=True):
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return model.lm_head(model.get_decoder().norm(hidden))


def capture_replay(model, batch: torch.Tensor) -> Replay:
    """Record every decoder layer's input on one batch (the reference, unquantized pass)."""
    inputs, kwargs = [], []

    def pre_hook(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.inference_mode():
            model.get_decoder()(batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Replay(inputs, kwargs)
