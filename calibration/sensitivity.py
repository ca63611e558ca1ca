"""Step 2: how much quantizing one layer alone, with one (K, V) pair, hurts.

Two measures per layer x pair, both with the served quantizer (format.fake_quantize):
- attention-output error: ||attn(Q, K̂, V̂) - attn(Q, K, V)|| / ||attn(Q, K, V)|| on the captured
  calibration tensors (cheap, all tokens): the paper's layer-wise sensitivity signal;
- next-token KL: mean KL(p_ref || p_quant) of the final distribution when only that layer's cache
  is quantized (the rest of the model rerun from that layer's stored input): what the search sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibration import simulate
from calibration.capture import LayerQKV, Replay
from kvtuner_vllm import format as kvformat
from kvtuner_vllm.precision_map import LayerPrecision


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal GQA attention in float32 (queries see their own keys, as in the served cache). No sliding
    window: calibration windows (--seq-len, 256) are far shorter than any supported model's window."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=True, scale=scaling)


def attention_error(
    captured: Sequence[LayerQKV], pairs: Sequence[LayerPrecision], group_size: int, chunk: int = 4
) -> torch.Tensor:
    """Relative attention-output error, float64 [layers, pairs]."""
    errors = torch.zeros(len(captured), len(pairs), dtype=torch.float64)
    for layer, qkv in enumerate(tqdm(captured, desc="attention error", unit="layer", leave=False)):
        for start in range(0, qkv.query.shape[0], chunk):
            q, k, v = (t[start : start + chunk] for t in (qkv.query, qkv.key, qkv.value))
            reference = _attend(q, k, v, qkv.scaling)
            for index, p in enumerate(pairs):
                k_hat = kvformat.fake_quantize(k, p.key_bits, group_size)
                v_hat = kvformat.fake_quantize(v, p.value_bits, group_size)
                diff = _attend(q, k_hat, v_hat, qkv.scaling) - reference
                errors[layer, index] += diff.double().pow(2).sum()
        errors[layer] = (errors[layer] / _sq_norm(captured[layer], chunk)).sqrt()
    return errors


def _sq_norm(qkv: LayerQKV, chunk: int) -> float:
    return sum(
        _attend(*(t[s : s + chunk] for t in (qkv.query, qkv.key, qkv.value)), qkv.scaling).double().pow(2).sum().item()
        for s in range(0, qkv.query.shape[0], chunk)
    )


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_ref || p) over the vocabulary, float32 [..., positions]."""
    return Reference(reference_logits).kl(logits)


class Reference:
    """The unquantized next-token distribution, prepared once: KL against it then costs one log-softmax
    (KL = sum p_ref log p_ref - sum p_ref log p), which halves the cost of the many KL evaluations."""

    def __init__(self, logits: torch.Tensor):
        log_probs = F.log_softmax(logits.float(), dim=-1)
        self.probs = log_probs.exp()
        self.neg_entropy = (self.probs * log_probs).sum(-1)

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        return self.neg_entropy - (self.probs * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def kl_sensitivity(
    model,
    replay: Replay,
    pairs: Sequence[LayerPrecision],
    group_size: int,
    only: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Mean next-token KL against the unquantized model, float64 [layers, pairs], one layer quantized at a time.

    `only[layer]` limits the pairs measured for that layer (the others are NaN): pruning's survivors.
    """
    num_layers = len(replay.inputs)
    todo = [(layer, index) for layer in range(num_layers)
            for index in (only[layer] if only is not None else range(len(pairs)))]
    table = torch.full((num_layers, len(pairs)), float("nan"), dtype=torch.float64)
    with torch.inference_mode():
        reference = Reference(replay.logits_from(model, 0))
        for layer, index in tqdm(todo, desc="KL sensitivity", unit="run", leave=False):
            p = pairs[index]
            if (p.key_bits, p.value_bits) == (16, 16):
                table[layer, index] = 0.0
                continue
            with simulate.quantized(model, {layer: p}, group_size):
                table[layer, index] = reference.kl(replay.logits_from(model, layer)).mean()
    return table
