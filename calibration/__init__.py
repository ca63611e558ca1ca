"""Offline calibration of per-layer KV-cache precision maps (KVTuner-style), importable without vLLM.

Pipeline (one module per step): data -> capture -> sensitivity -> pruning -> clustering ->
search -> evaluate -> report; `pipeline` runs them with resumable caches, `cli` is the command.
"""

from calibration.common import CANDIDATE_PAIRS, CalibrationError

__all__ = ["CANDIDATE_PAIRS", "CalibrationError"]
