"""Builders shared by the kernel tests: one layer step of a varlen batch over a paged cache.

Each sequence has a history (positions written in earlier steps, by the reference writers:
packed pages and, with a window, its ring) and this step's rows. Imported as a plain module
(pytest puts this folder on sys.path for its test files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from kvtuner_vllm import format as kvformat

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The bit pairs the calibration searches over, plus the unquantized and mixed-16 corners.
ATTENTION_BIT_PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2), (16, 16), (16, 4), (2, 8)]

# Output tolerance against the reference: both compute in fp32 from the same dequantized and
# full-precision keys and values, and only the order of the additions differs, so the gap is
# the final rounding to the dtype (1 ulp: 2^-8 relative for bf16, 2^-11 for fp16) plus fp32 noise.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 8e-3, "rtol": 1.6e-2},
}


def layer_format(key_bits: int, value_bits: int, head_size: int, group_size: int, dtype=torch.bfloat16, *,
                 window: int = 0, key_group_size: int = 0) -> kvformat.LayerFormat:
    """A format of either scheme: key_group_size > 0 means kivi keys (its window must be >= it)."""
    scheme = kvformat.KIVI if key_group_size else kvformat.PER_TOKEN
    return kvformat.LayerFormat(key_bits, value_bits, head_size, group_size, dtype, scheme=scheme,
                                key_group_size=key_group_size, residual_length=window)


@dataclass
class PagedBatch:
    """One step of a varlen batch: the caches as the earlier steps left them, this step's rows."""

    fmt: kvformat.LayerFormat
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D]: this step's rows
    value: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [T]
    cache_before: torch.Tensor  # uint8 [B, Hkv, N, C] before this step's write
    kv_cache: torch.Tensor  # after this step's reference write: what attention reads
    ring_cache: torch.Tensor | None  # [R_blocks, Hkv, R, 2D], filled by the earlier steps
    ring_block_ids: torch.Tensor | None  # int32 [S]
    block_table: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D]: every position, as written
    values: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[2]

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def to(self, device: str) -> PagedBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def _slots(block_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_row[positions // block_size].long() * block_size + positions % block_size


def make_batch(
    fmt: kvformat.LayerFormat,
    seq_lens: list[int],
    query_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    seed: int = 0,
) -> PagedBatch:
    """Sequence s has seq_lens[s] positions, the last query_lens[s] of them this step's rows.

    Its history is written in one earlier step by the reference writers into shuffled blocks
    (spare blocks and unwritten slots hold random bytes, rings random values: whatever a kernel
    must not read). Keys get a per-channel offset (as real keys have outlier channels) so that
    groups have different ranges; values are standard normal.
    """
    generator = torch.Generator().manual_seed(seed)
    head_size, dtype, num_seqs = fmt.head_size, fmt.dtype, len(seq_lens)
    blocks_per_seq = max(math.ceil(length / block_size) for length in seq_lens)
    num_blocks = num_seqs * blocks_per_seq + 3
    block_ids = torch.randperm(num_blocks, generator=generator)[: num_seqs * blocks_per_seq]
    block_table = block_ids.view(num_seqs, blocks_per_seq).to(torch.int32)
    kv_cache = torch.randint(0, 256, fmt.cache_shape(num_blocks, num_kv_heads, block_size), dtype=torch.uint8,
                             generator=generator)
    ring_cache = ring_block_ids = None
    if fmt.has_window:
        ring_cache = torch.randn(fmt.ring_shape(num_seqs + 2, num_kv_heads), generator=generator).to(dtype)
        ring_block_ids = torch.randperm(num_seqs + 2, generator=generator)[:num_seqs].to(torch.int32)
    channel_offset = torch.randn(num_kv_heads, head_size, generator=generator) * 2
    keys = [(torch.randn(n, num_kv_heads, head_size, generator=generator) + channel_offset).to(dtype) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_size, generator=generator).to(dtype) for n in seq_lens]
    for seq, (length, rows) in enumerate(zip(seq_lens, query_lens, strict=True)):
        history = length - rows
        if history == 0:
            continue
        one_seq = {"query_start_loc": torch.tensor([0, history], dtype=torch.int32),
                   "seq_lens": torch.tensor([history], dtype=torch.int32)}
        ring_id = None if ring_block_ids is None else ring_block_ids[seq : seq + 1]
        kvformat.quantize_and_cache_ref(keys[seq][:history], values[seq][:history], kv_cache,
                                        _slots(block_table[seq], torch.arange(history), block_size), fmt,
                                        ring_cache=ring_cache, ring_block_ids=ring_id, **one_seq)
        if ring_cache is not None:
            kvformat.write_window_ref(keys[seq][:history], values[seq][:history], ring_cache, ring_id,
                                      fmt=fmt, **one_seq)
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    key = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens, strict=True)])
    value = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens, strict=True)])
    slot_mapping = torch.cat([_slots(block_table[s], torch.arange(n - q, n), block_size)
                              for s, (n, q) in enumerate(zip(seq_lens, query_lens, strict=True))])
    query = torch.randn(key.shape[0], num_q_heads, head_size, generator=generator).to(dtype)
    cache_before = kv_cache.clone()
    kvformat.quantize_and_cache_ref(key, value, kv_cache, slot_mapping, fmt, query_start_loc, seq_lens_t, ring_cache,
                                    ring_block_ids)
    return PagedBatch(fmt, query, key, value, slot_mapping, cache_before, kv_cache, ring_cache, ring_block_ids,
                      block_table, seq_lens_t, query_start_loc, keys, values)


def reference_attention(batch: PagedBatch, scale: float, softcap: float | None = None) -> torch.Tensor:
    return kvformat.paged_attention_ref(batch.query, batch.key, batch.value, batch.kv_cache, batch.block_table,
                                        batch.seq_lens, batch.query_start_loc, scale, batch.fmt, batch.ring_cache,
                                        batch.ring_block_ids, softcap)
