"""Shared vocabulary of the calibration steps: candidate (K, V) pairs and the error type."""

from __future__ import annotations

from calibration.errors import CalibrationError
from kvtuner_vllm.precision_map import LayerPrecision

__all__ = ["CANDIDATE_PAIRS", "REFERENCE_PAIR", "SEARCH_PAIRS", "CalibrationError", "pair", "pair_bits"]


def pair(key_bits: int, value_bits: int) -> LayerPrecision:
    return LayerPrecision(key_bits=key_bits, value_bits=value_bits)


# The paper's candidate pairs (KVTuner §4), from most to fewest bits. KV16 is the unquantized
# reference: it is scored too (zero error) so the search may keep a layer unquantized.
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
