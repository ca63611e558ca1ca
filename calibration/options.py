"""The calibration run's options (light: the CLI parses and checks them before importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from calibration.errors import CalibrationError

MIN_BUDGET, MAX_BUDGET = 2.0, 16.0
SCHEMES = ("per-token-group", "kivi")  # kvtuner_vllm.format.SCHEMES, without importing torch


@dataclass
class Options:
    model_dir: str
    budget: float
    out_dir: str
    text: list[str] = field(default_factory=list)
    cache_dir: str | None = None  # default OUT_DIR/.cache; share one between budgets to reuse measurements
    # Format options searched (categorical, one per map)
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    group_sizes: list[int] = field(default_factory=lambda: [32, 64])
    windows: list[int] = field(default_factory=lambda: [0, 32, 64])  # residual_length R
    key_group_sizes: list[int] = field(default_factory=lambda: [32, 64])  # kivi G_t
    block_size: int = 128  # the server's (vLLM --block-size): the window never leaves a block
    # Data
    tokens: int = 1024  # calibration tokens: every search evaluation runs on them
    selection_tokens: int = 2048  # selection tokens: the choice among the front and the uniform maps
    report_tokens: int = 2048  # report tokens: the numbers the report gives for the maps it lists
    sensitivity_tokens: int = 512  # tokens of the surrogate's measurements
    seq_len: int = 512
    # Search
    formats: int = 2  # options kept for the search (ranked by the exact surrogate front at the budget)
    band: float = 1.0  # the search looks at maps with average bits in [budget - band, budget]
    seeds_per_format: int = 2  # exact-front maps per kept option in the initial population
    pop_size: int = 10
    offspring: int = 6  # new maps per generation
    generations: int = 3  # the initial population counts as the first
    verify: int = 3  # front maps scored on the selection text (the lowest calibration KL ones)
    seed: int = 0
    # Machine
    device: str = "cpu"
    dtype: str | None = "float32"  # compute dtype; float32 keeps bf16 rounding noise out of the KL
    matmul_dtype: str = "auto"  # the decoder layers' products: bf16 for a bf16 checkpoint (calibration.model)
    batch_size: int = 2
    state_mb: int = 1024  # memory for hidden states kept by map prefix (evaluate.PrefixStates)
    threads: int | None = None  # CPU threads; None: the cores not already busy (see cpu_threads)


def check_options(opts: Options) -> None:
    if not MIN_BUDGET <= opts.budget <= MAX_BUDGET:
        raise CalibrationError(
            f"--budget {opts.budget}: must be between {MIN_BUDGET:g} (KV2 everywhere) and {MAX_BUDGET:g} (unquantized)"
        )
    for name in ("tokens", "selection_tokens", "report_tokens", "sensitivity_tokens", "seq_len", "formats",
                 "seeds_per_format", "verify", "batch_size", "block_size", "generations", "offspring"):
        if getattr(opts, name) < 1:
            raise CalibrationError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.pop_size < 4:
        raise CalibrationError("--pop-size must be at least 4")
    if opts.band <= 0:
        raise CalibrationError("--band must be positive")
    if opts.sensitivity_tokens > opts.tokens:
        raise CalibrationError("--sensitivity-tokens cannot exceed --tokens (it uses the first calibration windows)")
    unknown = [s for s in opts.schemes if s not in SCHEMES]
    if unknown:
        raise CalibrationError(f"--schemes: unknown {unknown}; use {list(SCHEMES)}")
