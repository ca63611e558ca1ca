"""Builders shared by the kernel tests: random paged caches and varlen batches.

Imported as a plain module (pytest puts this folder on sys.path for its test files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtuner_vllm import format as kvformat

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The bit pairs the calibration searches over, plus the unquantized and mixed-16 corners.
ATTENTION_BIT_PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2), (16, 16), (16, 4), (2, 8)]

# Output tolerance against the dequantized reference: both compute in fp32 and only the
# order of the additions differs, so the gap is the final rounding to the dtype
# (1 ulp: 2^-8 relative for bf16, 2^-11 for fp16) plus fp32 noise.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 8e-3, "rtol": 1.6e-2},
}


@dataclass
class PagedBatch:
    """A varlen batch over a paged cache, with the unquantized K/V it was written from."""

    fmt: kvformat.LayerFormat
    query: torch.Tensor  # [T, Hq, D]
    kv_cache: torch.Tensor  # uint8 [B, Hkv, N, C]
    block_table: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D], as written
    values: list[torch.Tensor]

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def to(self, device: str) -> PagedBatch:
        moved = {name: getattr(self, name).to(device) for name in
                 ("query", "kv_cache", "block_table", "seq_lens", "query_start_loc")}
        return PagedBatch(fmt=self.fmt, keys=self.keys, values=self.values, **moved)


def make_batch(
    fmt: kvformat.LayerFormat,
    seq_lens: list[int],
    query_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    seed: int = 0,
) -> PagedBatch:
    """Random K/V written with the reference writer into shuffled blocks, and random queries.

    Keys get a per-channel offset (as real keys have outlier channels) so that groups
    have different ranges; values are standard normal.
    """
    generator = torch.Generator().manual_seed(seed)
    head_size, dtype = fmt.head_size, fmt.dtype
    blocks_per_seq = max(math.ceil(length / block_size) for length in seq_lens)
    num_blocks = len(seq_lens) * blocks_per_seq + 3  # spare blocks stay garbage, never read
    block_ids = torch.randperm(num_blocks, generator=generator)[: len(seq_lens) * blocks_per_seq]
    block_table = block_ids.view(len(seq_lens), blocks_per_seq).to(torch.int32)
    kv_cache = torch.randint(0, 256, fmt.cache_shape(num_blocks, num_kv_heads, block_size), dtype=torch.uint8,
                             generator=generator)
    channel_offset = torch.randn(num_kv_heads, head_size, generator=generator) * 2
    keys, values = [], []
    for seq, length in enumerate(seq_lens):
        key = (torch.randn(length, num_kv_heads, head_size, generator=generator) + channel_offset).to(dtype)
        value = torch.randn(length, num_kv_heads, head_size, generator=generator).to(dtype)
        positions = torch.arange(length)
        slots = block_table[seq, positions // block_size].long() * block_size + positions % block_size
        kvformat.quantize_and_cache_ref(key, value, kv_cache, slots, fmt)
        keys.append(key)
        values.append(value)
    query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    query = torch.randn(int(query_start_loc[-1]), num_q_heads, head_size, generator=generator).to(dtype)
    return PagedBatch(fmt, query, kv_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32),
                      query_start_loc, keys, values)


def reference_attention(batch: PagedBatch, scale: float, sliding_window=None, softcap=None) -> torch.Tensor:
    return kvformat.paged_attention_ref(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens,
                                        batch.query_start_loc, scale, batch.fmt, sliding_window, softcap)
