"""Offline calibration of per-layer KV-cache precision maps (KVTuner-style), importable without vLLM.

Pipeline (one module per step): data -> capture -> sensitivity (the surrogate) -> dp (its exact
front) -> pruning -> search (NSGA-II on real evaluations, evaluate) -> choose (on selection text)
-> report (on report text); `pipeline` runs them with resumable caches, `cli` is the command.
Importing the package is light (no torch), so `kvtuner-calibrate --help` and argument errors are instant.
"""

from calibration.errors import CalibrationError

__all__ = ["CalibrationError"]
