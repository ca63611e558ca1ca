"""The surrogate: a predicted end-to-end KL for every layer, pair and format option, from cheap
measurements, so that the exact front (dp) can seed the real search.

    predicted KL(layer l, pair p, option f) = a_l * (e_K(l, p.key_bits, f)^2 + e_V(l, p.value_bits, f)^2)

- e_K, e_V: relative attention-output error of layer l when only its keys (only its values) are
  stored as option f says, with the served attention (reference.simulated_attention: window, kivi
  groups) on the captured reference Q/K/V. K and V errors are independent, so their squares add.
  Keys depend on (scheme, group or key group, window), values on (group, window): measuring the
  two sides apart costs |key configs| + |value configs| runs per bit width, not their product.
- a_l: how much one layer's attention error costs at the output: the single-layer next-token KL
  (layers after l rerun from l's stored input) of one reference (pair, option), divided by its
  squared error. A small perturbation costs KL quadratic in its size, so one ratio per layer
  carries over to the other pairs and options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration import capture, simulate
from calibration.capture import LayerQKV, Replay
from calibration.common import SEARCH_PAIRS, FormatOption, pair
from calibration.evaluate import Reference
from kvtuner_vllm import format as kvformat
from kvtuner_vllm import reference as kvref

QUANTIZED_BITS = (2, 4, 8)
REFERENCE_PAIR = pair(4, 4)
FLOOR = 1e-12  # squared errors below this count as zero when dividing
QUERY_STRIDE = 4  # attention error over every 4th query position: a quarter of the cost


def key_config(option: FormatOption) -> tuple:
    """What the key side of an option depends on."""
    if option.scheme == kvformat.KIVI:
        return (option.scheme, option.key_group_size, option.residual_length)
    return (option.scheme, option.group_size, option.residual_length)


def value_config(option: FormatOption) -> tuple:
    return (option.group_size, option.residual_length)


@dataclass
class Surrogate:
    options: list[FormatOption]
    key_error: np.ndarray  # [layers, key configs, bits]: squared relative attention error, keys only
    value_error: np.ndarray  # [layers, value configs, bits]
    key_configs: list[tuple]
    value_configs: list[tuple]
    scale: np.ndarray  # [layers]: a_l
    reference_kl: np.ndarray  # [layers]: the single-layer KL that a_l comes from
    reference_option: FormatOption

    def squared_error(self, option: FormatOption) -> np.ndarray:
        """[layers, SEARCH_PAIRS] summed squared K and V attention error under `option`."""
        k, v = self.key_configs.index(key_config(option)), self.value_configs.index(value_config(option))
        table = np.zeros((self.key_error.shape[0], len(SEARCH_PAIRS)))
        for index, p in enumerate(SEARCH_PAIRS):
            if p.key_bits in QUANTIZED_BITS:
                table[:, index] += self.key_error[:, k, QUANTIZED_BITS.index(p.key_bits)]
            if p.value_bits in QUANTIZED_BITS:
                table[:, index] += self.value_error[:, v, QUANTIZED_BITS.index(p.value_bits)]
        return table

    def table(self, option: FormatOption) -> np.ndarray:
        """[layers, SEARCH_PAIRS] predicted single-layer KL under `option`."""
        return self.scale[:, None] * self.squared_error(option)

    def predict(self, option: FormatOption, layers: Sequence[int]) -> float:
        table = self.table(option)
        return float(sum(table[layer, p] for layer, p in enumerate(layers)))


def served_rows(qkv: LayerQKV, fmt: kvformat.LayerFormat, block_size: int, positions: torch.Tensor) -> torch.Tensor:
    """The rows of reference.simulated_attention at query `positions` only (the same rule, reference.mixed_attention,
    over the whole key range): [windows, q_heads, len(positions), head_dim] float32."""
    kvformat.check_block_size(fmt, block_size)
    key_hat = kvref.fake_quantize_keys(qkv.key, fmt)
    value_hat = kvref.fake_quantize(qkv.value, fmt.value_bits, fmt.group_size)
    return torch.stack([
        kvref.mixed_attention(q[:, positions], k, v, kh, vh, positions, block_size, fmt.window, qkv.scaling)
        for q, k, v, kh, vh in zip(qkv.query, qkv.key, qkv.value, key_hat, value_hat)
    ])


def _relative_error(qkv: LayerQKV, fmt: kvformat.LayerFormat, exact: torch.Tensor, block_size: int,
                    positions: torch.Tensor) -> float:
    out = served_rows(qkv, fmt, block_size, positions)
    return float((out - exact).double().pow(2).sum() / exact.double().pow(2).sum().clamp(min=FLOOR))


def attention_errors(captured: Sequence[LayerQKV], options: Sequence[FormatOption], block_size: int,
                     query_stride: int = QUERY_STRIDE):
    """(key_error, value_error, key_configs, value_configs), see Surrogate. The error is taken over every
    `query_stride`-th query position (attention costs queries x keys; every position still serves as a key)."""
    key_configs = sorted({key_config(o) for o in options})
    value_configs = sorted({value_config(o) for o in options})
    key_sides = [next(o for o in options if key_config(o) == c) for c in key_configs]
    value_sides = [next(o for o in options if value_config(o) == c) for c in value_configs]
    key_error = np.zeros((len(captured), len(key_configs), len(QUANTIZED_BITS)))
    value_error = np.zeros((len(captured), len(value_configs), len(QUANTIZED_BITS)))
    with torch.inference_mode():
        for layer, qkv in enumerate(tqdm(captured, desc="attention error", unit="layer", leave=False)):
            head_size, dtype = qkv.key.shape[-1], qkv.key.dtype
            positions = torch.arange(query_stride - 1, qkv.key.shape[-2], query_stride)
            unquantized = kvformat.LayerFormat(16, 16, head_size, head_size, dtype)
            exact = served_rows(qkv, unquantized, block_size, positions)
            for b, bits in enumerate(QUANTIZED_BITS):
                for c, option in enumerate(key_sides):
                    fmt = option.layer_format(pair(bits, 16), head_size, dtype)
                    key_error[layer, c, b] = _relative_error(qkv, fmt, exact, block_size, positions)
                for c, option in enumerate(value_sides):
                    fmt = option.layer_format(pair(16, bits), head_size, dtype)
                    value_error[layer, c, b] = _relative_error(qkv, fmt, exact, block_size, positions)
    return key_error, value_error, key_configs, value_configs


def single_layer_kl(model, replay: Replay, formats: Sequence[kvformat.LayerFormat], block_size: int) -> np.ndarray:
    """[layers] mean next-token KL against the reference when only layer l uses formats[l]."""
    reference_formats = capture.unquantized_formats(model)
    kl = np.zeros(len(formats))
    with torch.inference_mode():
        with simulate.served(model, reference_formats, block_size):
            reference = Reference(replay.logits_from(model, 0)[:, :-1])
        for layer in tqdm(range(len(formats)), desc="single-layer KL", unit="layer", leave=False):
            served = {**dict(enumerate(reference_formats)), layer: formats[layer]}
            with simulate.served(model, served, block_size):
                kl[layer] = float(reference.kl(replay.logits_from(model, layer)[:, :-1]).mean())
    return kl


def measure(model, captured: Sequence[LayerQKV], replay: Replay, options: Sequence[FormatOption],
            block_size: int) -> Surrogate:
    key_error, value_error, key_configs, value_configs = attention_errors(captured, options, block_size)
    surrogate = Surrogate(list(options), key_error, value_error, key_configs, value_configs,
                          scale=np.ones(len(captured)), reference_kl=np.zeros(len(captured)),
                          reference_option=options[0])
    # The reference option: the one where KV4 errs most (the clearest single-layer signal).
    column = SEARCH_PAIRS.index(REFERENCE_PAIR)
    reference = max(options, key=lambda o: surrogate.squared_error(o)[:, column].mean())
    head_size, dtype = captured[0].key.shape[-1], captured[0].key.dtype
    fmt = reference.layer_format(REFERENCE_PAIR, head_size, dtype)
    kl = single_layer_kl(model, replay, [fmt] * len(captured), block_size)
    squared = surrogate.squared_error(reference)[:, column]
    surrogate.scale = np.maximum(kl, 0.0) / np.maximum(squared, FLOOR)
    surrogate.reference_kl = kl
    surrogate.reference_option = reference
    return surrogate
