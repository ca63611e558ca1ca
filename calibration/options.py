"""The calibration run's options (light: the CLI parses and checks them before importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from calibration.errors import CalibrationError

MIN_BUDGET, MAX_BUDGET = 2.0, 16.0


@dataclass
class Options:
    model_dir: str
    budget: float
    out_dir: str
    text: list[str] = field(default_factory=list)
    group_size: int = 64
    tokens: int = 1024  # calibration tokens (attention error, verification)
    heldout_tokens: int = 1024
    sensitivity_tokens: int = 256  # tokens of the per-layer KL pass (layers x pairs reruns)
    seq_len: int = 256
    groups: int = 16
    verify: int = 6  # front points checked with real forward passes
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = 4
    generations: int = 200
    pop_size: int = 128
    threads: int | None = None  # CPU threads; None: the cores not already busy (see cpu_threads)


def check_options(opts: Options) -> None:
    if not MIN_BUDGET <= opts.budget <= MAX_BUDGET:
        raise CalibrationError(
            f"--budget {opts.budget}: must be between {MIN_BUDGET:g} (KV2 everywhere) and {MAX_BUDGET:g} (unquantized)"
        )
    for name in ("tokens", "heldout_tokens", "sensitivity_tokens", "seq_len", "groups", "verify", "batch_size"):
        if getattr(opts, name) < 1:
            raise CalibrationError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.sensitivity_tokens > opts.tokens:
        raise CalibrationError("--sensitivity-tokens cannot exceed --tokens (it uses the first calibration windows)")
