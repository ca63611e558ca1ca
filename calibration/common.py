"""Shared vocabulary of the calibration steps: the per-layer (K, V) pairs, the map-wide format
options (scheme, channel group, kivi key group, window) and a candidate map (one option + one
pair per layer), with what each costs: code bits as KVTuner counts them and bytes as the server
stores them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch

from calibration.errors import CalibrationError
from kvtuner_vllm import format as kvformat
from kvtuner_vllm.precision_map import LayerPrecision, PrecisionMap

__all__ = ["CANDIDATE_PAIRS", "REFERENCE_PAIR", "SEARCH_PAIRS", "Candidate", "CalibrationError", "FormatOption",
           "format_options", "pair", "pair_bits"]


def pair(key_bits: int, value_bits: int) -> LayerPrecision:
    return LayerPrecision(key_bits=key_bits, value_bits=value_bits)


# The paper's candidate pairs (KVTuner §4), from most to fewest bits. KV16 is the unquantized
# reference: the search may keep a layer unquantized.
CANDIDATE_PAIRS: tuple[LayerPrecision, ...] = (
    pair(8, 8),
    pair(8, 4),
    pair(4, 8),
    pair(4, 4),
    pair(8, 2),
    pair(4, 2),
    pair(2, 4),
    pair(2, 2),
)
REFERENCE_PAIR = pair(16, 16)
SEARCH_PAIRS: tuple[LayerPrecision, ...] = (REFERENCE_PAIR, *CANDIDATE_PAIRS)


def pair_bits(p: LayerPrecision) -> float:
    """Average bits of one layer, (K + V) / 2, as KVTuner and PrecisionMap.avg_bits count them."""
    return (p.key_bits + p.value_bits) / 2


def pair_cost(p: LayerPrecision) -> int:
    """K + V bits: the integer cost the exact front is computed on (avg bits = sum / (2 * layers))."""
    return p.key_bits + p.value_bits


@dataclass(frozen=True, order=True)
class FormatOption:
    """What every layer of a map shares besides its bits (PrecisionMap.format_options)."""

    scheme: str
    group_size: int
    key_group_size: int  # kivi only, else 0
    residual_length: int

    @property
    def label(self) -> str:
        keys = f"kivi Gt{self.key_group_size} " if self.scheme == kvformat.KIVI else "per-token "
        return f"{keys}G{self.group_size} R{self.residual_length}"

    def layer_format(self, p: LayerPrecision, head_size: int, dtype: torch.dtype) -> kvformat.LayerFormat:
        return kvformat.LayerFormat(p.key_bits, p.value_bits, head_size, self.group_size, dtype, self.scheme,
                                    self.key_group_size, self.residual_length)

    @property
    def options(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, "key_group_size": self.key_group_size,
                "residual_length": self.residual_length}


def format_options(head_size: int, block_size: int, schemes: Iterable[str], group_sizes: Iterable[int],
                   windows: Iterable[int], key_group_sizes: Iterable[int]) -> list[FormatOption]:
    """Every combination the format allows for this head size and server block size (sorted)."""
    found = set()
    for scheme in schemes:
        for group in group_sizes:
            for window in windows:
                for key_group in (key_group_sizes if scheme == kvformat.KIVI else (0,)):
                    option = FormatOption(scheme, group, key_group, window)
                    try:
                        layer = option.layer_format(pair(4, 4), head_size, torch.bfloat16)
                        kvformat.check_block_size(layer, block_size)
                    except ValueError:
                        continue
                    found.add(option)
    if not found:
        raise CalibrationError("no valid format option: check --schemes, --group-sizes, --windows, --key-group-sizes "
                               "against the head size and --block-size")
    return sorted(found)


@dataclass(frozen=True)
class Candidate:
    """One map: a format option and a SEARCH_PAIRS index per layer."""

    option: FormatOption
    layers: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.option.label}|" + ",".join(SEARCH_PAIRS[i].label for i in self.layers)

    @property
    def pairs(self) -> list[LayerPrecision]:
        return [SEARCH_PAIRS[i] for i in self.layers]

    @cached_property
    def avg_bits(self) -> float:
        return sum(pair_cost(p) for p in self.pairs) / (2 * len(self.layers))

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1

    @property
    def name(self) -> str:
        """Short human name: 'uniform KV4 (kivi Gt32 G32 R32)' or 'map 3.97 bits (...)'."""
        what = f"uniform {self.pairs[0].label}" if self.uniform else f"map {self.avg_bits:.3f} bits"
        return f"{what} ({self.option.label})"

    def layer_formats(self, head_size: int, dtype: torch.dtype) -> list[kvformat.LayerFormat]:
        return [self.option.layer_format(p, head_size, dtype) for p in self.pairs]

    def precision_map(self, model: str | None = None, calibration: dict | None = None) -> PrecisionMap:
        return PrecisionMap(model=model, num_layers=len(self.layers), layers=self.pairs, calibration=calibration,
                            **self.option.options)

    @classmethod
    def uniform_map(cls, option: FormatOption, p: LayerPrecision, num_layers: int) -> Candidate:
        return cls(option, (SEARCH_PAIRS.index(p),) * num_layers)


@dataclass(frozen=True)
class Geometry:
    """The KV geometry that prices a map, in the dtype the server stores (the checkpoint's)."""

    head_size: int
    num_kv_heads: int
    dtype: torch.dtype

    def bytes_per_token(self, candidate: Candidate) -> int:
        """Packed KV bytes one token costs across all layers and KV heads."""
        return self.num_kv_heads * sum(f.bytes_per_token for f in candidate.layer_formats(self.head_size, self.dtype))

    def unquantized_bytes_per_token(self, num_layers: int) -> int:
        return num_layers * self.num_kv_heads * 2 * self.head_size * self.dtype.itemsize

    def capacity(self, candidate: Candidate) -> float:
        """Tokens the same KV memory holds relative to the unquantized cache."""
        return self.unquantized_bytes_per_token(len(candidate.layers)) / self.bytes_per_token(candidate)

    def ring_bytes(self, candidate: Candidate) -> int:
        """Bytes of one running request's full-precision window rings (a per-request, not per-token, cost)."""
        return self.num_kv_heads * sum(f.window_bytes for f in candidate.layer_formats(self.head_size, self.dtype))

    def costs(self, candidate: Candidate) -> dict:
        return {"avg_bits": candidate.avg_bits, "bytes_per_token": self.bytes_per_token(candidate),
                "capacity_vs_unquantized": self.capacity(candidate),
                "ring_bytes_per_request": self.ring_bytes(candidate)}
