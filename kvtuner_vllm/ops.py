"""Python entry points of the kernels (torch.ops.kvtuner.*), with fake implementations.

The compiled extension `kvtuner_vllm._C` is imported (and the fakes registered) on the
first call or by `load_kernels()`, not at import time, so importing this module is cheap
and works before the extension is built; a missing or stale build raises
`KernelsNotBuiltError` with the command that fixes it. Every op writes in place (the cache,
the ring, the output) and returns nothing; reference.py holds the reference of each.

A step of one layer runs, in order: `quantize_and_cache` (packed pages), `paged_attention`,
then `write_window` (the ring, for the next steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvtuner_vllm.format import LayerFormat

_REPO_ROOT = Path(__file__).resolve().parent.parent
_BUILD_HINT = f"run `pip install -e . --no-build-isolation` in {_REPO_ROOT}"
_loaded = False


class KernelsNotBuiltError(RuntimeError):
    """The kvtuner_vllm._C extension is missing or was compiled against another torch."""


def load_kernels() -> None:
    """Imports kvtuner_vllm._C once, which registers torch.ops.kvtuner.*."""
    global _loaded
    if _loaded:
        return
    try:
        from kvtuner_vllm import _C
    except ImportError as error:
        raise KernelsNotBuiltError(f"kvtuner_vllm._C is not built: {_BUILD_HINT} ({error})") from error
    if _C.torch_version != torch.__version__:
        raise KernelsNotBuiltError(
            f"kvtuner_vllm._C was built against torch {_C.torch_version}, running {torch.__version__}: "
            f"rebuild with `python setup.py build_ext --inplace` (or {_BUILD_HINT})"
        )
    _register_fakes()
    _loaded = True


def quantize_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: LayerFormat,
    query_start_loc: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    ring_cache: torch.Tensor | None = None,
    ring_block_ids: torch.Tensor | None = None,
) -> None:
    """Quantize key/value [T, H_kv, D] into kv_cache uint8[B, H_kv, N, C] at slot_mapping
    (reference.quantize_and_cache_ref); kivi keys also read the sequences' rings."""
    load_kernels()
    torch.ops.kvtuner.quantize_and_cache(
        key, value, kv_cache, slot_mapping, ring_cache, ring_block_ids, query_start_loc, seq_lens,
        fmt.key_bits, fmt.value_bits, fmt.group_size, fmt.kernel_key_group_size, fmt.window,
    )


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    fmt: LayerFormat,
    ring_cache: torch.Tensor | None = None,
    ring_block_ids: torch.Tensor | None = None,
    softcap: float | None = None,
    workspace: torch.Tensor | None = None,
) -> None:
    """Varlen causal attention of query [T, H_q, D] into out [T, H_q, D] over the packed cache, the
    rings and the step's own key/value [T, H_kv, D] (reference.paged_attention_ref is the definition)."""
    load_kernels()
    torch.ops.kvtuner.paged_attention(
        out, query, key, value, kv_cache, ring_cache, ring_block_ids, block_table, seq_lens, query_start_loc,
        max_query_len, max_seq_len, scale, fmt.key_bits, fmt.value_bits, fmt.group_size,
        fmt.kernel_key_group_size, fmt.window, softcap or 0.0, workspace,
    )


def write_window(
    key: torch.Tensor,
    value: torch.Tensor,
    ring_cache: torch.Tensor,
    ring_block_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: LayerFormat,
) -> None:
    """After attention: each sequence's last min(R, rows) positions into its ring (reference.write_window_ref)."""
    load_kernels()
    torch.ops.kvtuner.write_window(key, value, ring_cache, ring_block_ids, query_start_loc, seq_lens, fmt.window)


@dataclass(frozen=True)
class CpuRoutes:
    """What the CPU `paged_attention` ran since the last `reset_cpu_routes()` (a debug view, for
    tests that assert the kernel a call took). Routes: "vector" (the vector kernel, build
    `vector_isa`), "amx_decode", "prefill_avx512_bf16", "prefill_amx" (the prefill kernel on
    that unit)."""

    items: dict[str, int]  # work items per route
    sequences: dict[str, int]  # per route, the sequences of each call with an item on it
    vector_isa: str  # "avx512", "avx2" or "baseline": chosen once per process (KVTUNER_CPU_ISA caps it)
    matrix_unit: str  # "amx", "avx512_bf16" or "none": the best the CPU offers

    def taken(self) -> set[str]:
        """The routes with at least one work item."""
        return {route for route, count in self.items.items() if count > 0}


def cpu_routes() -> CpuRoutes:
    load_kernels()
    items, sequences, vector_isa, matrix_unit = torch.ops.kvtuner.cpu_route_counts()
    return CpuRoutes(dict(items), dict(sequences), vector_isa, matrix_unit)


def reset_cpu_routes() -> None:
    load_kernels()
    torch.ops.kvtuner.reset_cpu_route_counts()


def format_constants() -> dict[str, tuple[int, ...]]:
    """The format's constants as the kernels hold them (csrc/packed_format.h, the CUDA work split
    in csrc/cuda/kernels/work_split.h), each a tuple; tests hold format.py to them."""
    load_kernels()
    return {name: tuple(values) for name, values in torch.ops.kvtuner.format_constants().items()}


def attention_workspace_size(
    num_seqs: int, max_query_len: int, num_q_heads: int, num_kv_heads: int, head_size: int
) -> int:
    """Bytes of scratch the CUDA `paged_attention` needs for a batch of `num_seqs` sequences whose
    queries are at most `max_query_len` tokens (the split's partial results; 0: no split). A
    `workspace` of at least this size is used as is; without one, the op allocates it. Computed by
    the CUDA launcher's own plan (exported by every build, CPU-only ones included)."""
    load_kernels()
    return torch.ops.kvtuner.attention_workspace_size(num_seqs, max_query_len, num_q_heads, num_kv_heads, head_size)


def max_attention_workspace_size(num_q_heads: int, num_kv_heads: int, head_size: int) -> int:
    """The largest `attention_workspace_size` over all batches (a few MiB): what to reserve once,
    e.g. from vLLM's workspace manager, so that every batch, CUDA-graph replays included, can
    pass the same `workspace`."""
    load_kernels()
    return torch.ops.kvtuner.max_attention_workspace_size(num_q_heads, num_kv_heads, head_size)


def _register_fakes() -> None:
    """Shape-only implementations for torch.compile / meta tensors: the ops only mutate."""

    @torch.library.register_fake("kvtuner::quantize_and_cache")
    def _(key, value, kv_cache, slot_mapping, ring_cache, ring_block_ids, query_start_loc, seq_lens, key_bits,
          value_bits, group_size, key_group_size, residual_length) -> None:
        return None

    @torch.library.register_fake("kvtuner::paged_attention")
    def _(out, query, key, value, kv_cache, ring_cache, ring_block_ids, block_table, seq_lens, query_start_loc,
          max_query_len, max_seq_len, scale, key_bits, value_bits, group_size, key_group_size, residual_length,
          softcap, workspace) -> None:
        return None

    @torch.library.register_fake("kvtuner::write_window")
    def _(key, value, ring_cache, ring_block_ids, query_start_loc, seq_lens, residual_length) -> None:
        return None
