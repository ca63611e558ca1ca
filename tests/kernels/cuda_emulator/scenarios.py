"""Multi-step scenarios for the CUDA ops, run on any implementation of them: the host emulator
(binding.EmulatorOps, CPU) or the real kernels (TorchOps, a CUDA device). Each step runs
quantize_and_cache -> paged_attention -> write_window on the ops and on the format.py
references (on the CPU); the cache and the ring must stay byte-identical, the attention output
within kernel_cases.TOLERANCE. Shared by tests/kernels/test_cuda_emulated.py and
scripts/gpu_sanitize.py (the compute-sanitizer cases of scripts/gpu_check.sh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from kernel_cases import TOLERANCE  # tests/kernels on the path (pytest, scripts/gpu_sanitize.py)

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops as kernel_ops
from kvtuner_vllm import reference as kvref


class Ops(Protocol):
    """The three ops on one device, for one layer format."""

    device: str
    fmt: kvformat.LayerFormat

    def quantize_and_cache(self, key, value, cache, slots, query_start_loc, seq_lens, ring, ring_ids) -> None: ...

    def paged_attention(self, out, query, key, value, cache, block_table, seq_lens, query_start_loc, max_query_len,
                        scale, ring, ring_ids, softcap) -> None: ...

    def write_window(self, key, value, ring, ring_ids, query_start_loc, seq_lens) -> None: ...


class TorchOps:
    """The registered ops (kvtuner_vllm.ops), with the split's workspace sized by
    ops.attention_workspace_size, so a size too small for the CUDA plan fails the launch."""

    def __init__(self, device: str, fmt: kvformat.LayerFormat):
        self.device, self.fmt = device, fmt

    def quantize_and_cache(self, key, value, cache, slots, query_start_loc, seq_lens, ring, ring_ids) -> None:
        kernel_ops.quantize_and_cache(key, value, cache, slots, self.fmt, query_start_loc, seq_lens, ring, ring_ids)

    def paged_attention(self, out, query, key, value, cache, block_table, seq_lens, query_start_loc, max_query_len,
                        scale, ring, ring_ids, softcap) -> None:
        size = kernel_ops.attention_workspace_size(seq_lens.numel(), max_query_len, query.shape[1], cache.shape[1],
                                                   self.fmt.head_size)
        workspace = torch.empty(size, dtype=torch.uint8, device=self.device)
        kernel_ops.paged_attention(out, query, key, value, cache, block_table, seq_lens, query_start_loc,
                                   max_query_len, int(seq_lens.max()), scale, self.fmt, ring, ring_ids, softcap,
                                   workspace)

    def write_window(self, key, value, ring, ring_ids, query_start_loc, seq_lens) -> None:
        kernel_ops.write_window(key, value, ring, ring_ids, query_start_loc, seq_lens, self.fmt)


@dataclass
class Scenario:
    fmt: kvformat.LayerFormat
    num_q_heads: int
    num_kv_heads: int
    block_size: int
    history: list[int]  # per sequence: positions written before the steps (by the references)
    chunks: list[list[int]]  # per sequence: its rows in each step (missing or 0: a padded entry)
    softcap: float | None = None
    padding_rows: int = 0  # rows past the last sequence, as vLLM pads the token dimension
    query_bound: int | None = None  # max_query_len passed instead of the true one (a fixed bound)
    seed: int = 0


def layer(bits, head, group, dtype=torch.bfloat16, scheme=kvformat.PER_TOKEN, key_group=0, window=0):
    return kvformat.LayerFormat(*bits, head, group, dtype, scheme, key_group, window)


KIVI = kvformat.KIVI
SCENARIOS = {
    # Decodes of long contexts split into partitions, no window (format v1), a padded entry.
    "decode-split-v1": Scenario(layer((4, 2), 64, 32), 4, 2, 16, [700, 5, 1100, 0], [[1, 1], [1, 1], [1], []],
                                padding_rows=3),
    # Window: decodes next to prefill chunks (one longer than the decode kernel takes), ring carried.
    "window-mixed": Scenario(layer((4, 2), 128, 64, window=8), 4, 2, 16, [300, 0, 40], [[1, 1, 1], [37, 20], [5, 1, 9]],
                             padding_rows=2),
    "kivi": Scenario(layer((4, 4), 64, 64, scheme=KIVI, key_group=16, window=32), 4, 2, 32, [100, 0, 47],
                     [[1, 1, 1], [20, 13, 1], [1, 17, 2]]),
    "kivi-fp16-gqa8": Scenario(layer((2, 8), 128, 32, torch.float16, KIVI, 32, 64), 8, 1, 64, [200, 10],
                               [[1, 1], [60, 3]]),
    "kivi-8-16": Scenario(layer((8, 16), 64, 32, scheme=KIVI, key_group=16, window=16), 2, 2, 16, [33, 0],
                          [[1, 15], [16, 2]]),
    "fp32-head96-softcap": Scenario(layer((8, 4), 96, 32, torch.float32, window=16), 6, 2, 16, [50, 0],
                                    [[2, 1], [24, 5]], softcap=30.0),
    "head80-fp16": Scenario(layer((16, 4), 80, 80, torch.float16, window=4), 4, 2, 16, [270, 3], [[3, 1], [20, 1]]),
    "head256": Scenario(layer((8, 8), 256, 128), 4, 2, 32, [70, 0], [[1], [40]]),
    "unquantized": Scenario(layer((16, 16), 64, 64, window=8), 4, 4, 16, [90, 0], [[1, 1], [18, 4]]),
    # Speculative decode (several query tokens per sequence in the decode kernel), GQA group 5.
    "spec-decode-gqa5": Scenario(layer((4, 4), 64, 32, window=16), 40, 8, 16, [150, 33, 1], [[4, 4], [4, 3], [4, 4]]),
    # The same batch with max_query_len a fixed bound, as a captured CUDA graph passes it.
    "graph-bounds": Scenario(layer((4, 2), 128, 64, window=8), 4, 2, 16, [400, 20, 0], [[1, 1], [1, 1], [0, 0]],
                             padding_rows=4, query_bound=16),
    "graph-bounds-tokens": Scenario(layer((2, 4), 64, 64, scheme=KIVI, key_group=16, window=16), 8, 2, 16,
                                    [600, 30], [[1, 1], [2, 1]], query_bound=64),
}


def random_rows(generator, rows, heads, head_size, dtype, offset=0.0):
    return (torch.randn(rows, heads, head_size, generator=generator) + offset).to(dtype)


@dataclass
class StepBatch:
    """One step's inputs, on the host."""

    key: torch.Tensor
    value: torch.Tensor
    query: torch.Tensor
    slots: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    block_table: torch.Tensor
    ring_ids: torch.Tensor | None
    max_query_len: int


class ScenarioState:
    """The sequences' K/V/Q and the paged cache and rings, on the host (what the references read)
    and on the ops' device (what the ops read and write)."""

    def __init__(self, sc: Scenario, device: str):
        fmt, self.sc, self.device = sc.fmt, sc, device
        generator = self.generator = torch.Generator().manual_seed(sc.seed)
        num_seqs, head_size, block_size = len(sc.history), fmt.head_size, sc.block_size
        totals = [h + sum(c) for h, c in zip(sc.history, sc.chunks)]
        blocks_per_seq = max(math.ceil(t / block_size) for t in totals)
        num_blocks = num_seqs * blocks_per_seq + 2  # block ids shuffled; spare blocks stay garbage
        table = torch.randperm(num_blocks, generator=generator)[: num_seqs * blocks_per_seq]
        self.block_table = table.view(num_seqs, blocks_per_seq).to(torch.int32)
        self.cache = torch.randint(0, 256, fmt.cache_shape(num_blocks, sc.num_kv_heads, block_size),
                                   dtype=torch.uint8, generator=generator)
        self.ring = self.ring_ids = None
        if fmt.has_window:  # NaN rings: a ring row read that the format does not call for shows
            self.ring = torch.full(fmt.ring_shape(num_seqs + 1, sc.num_kv_heads), float("nan"), dtype=fmt.dtype)
            self.ring_ids = torch.randperm(num_seqs + 1, generator=generator)[:num_seqs].to(torch.int32)
        channel_offset = torch.randn(sc.num_kv_heads, head_size, generator=generator) * 2  # outlier key channels
        self.keys = [random_rows(generator, t, sc.num_kv_heads, head_size, fmt.dtype, channel_offset) for t in totals]
        self.values = [random_rows(generator, t, sc.num_kv_heads, head_size, fmt.dtype) for t in totals]
        self.queries = [random_rows(generator, t, sc.num_q_heads, head_size, fmt.dtype) for t in totals]
        self.done = list(sc.history)
        self._write_history()
        self.device_cache = self.cache.to(device, copy=True)
        self.device_ring = self.ring.to(device, copy=True) if self.ring is not None else None

    def slots_of(self, seq, positions):
        block_size = self.sc.block_size
        return self.block_table[seq, positions // block_size].long() * block_size + positions % block_size

    def _write_history(self) -> None:
        """The earlier steps of each sequence, as the references wrote them (one step each)."""
        fmt = self.sc.fmt
        for seq, history in enumerate(self.sc.history):
            if not history:
                continue
            one = (torch.tensor([0, history], dtype=torch.int32), torch.tensor([history], dtype=torch.int32))
            ids = self.ring_ids[seq : seq + 1] if self.ring_ids is not None else None
            key, value = self.keys[seq][:history], self.values[seq][:history]
            kvref.quantize_and_cache_ref(key, value, self.cache, self.slots_of(seq, torch.arange(history)), fmt,
                                            *one, self.ring, ids)
            if self.ring is not None:
                kvref.write_window_ref(key, value, self.ring, ids, *one, fmt)

    def step_batch(self, step: int) -> StepBatch:
        sc, fmt = self.sc, self.sc.fmt
        rows = [c[step] if step < len(c) else 0 for c in sc.chunks]
        absent = torch.tensor(rows) == 0
        seq_lens = torch.tensor([d + r if r else 0 for d, r in zip(self.done, rows)], dtype=torch.int32)
        query_start_loc = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32)
        ring_ids = self.ring_ids.clone() if self.ring_ids is not None else None
        if ring_ids is not None:
            ring_ids[absent] = -1  # a padded entry's ring id is never read
        block_table = self.block_table.clone()
        block_table[absent] = 0  # padded entries point at a null block, as vLLM's do
        pick = [(seq, torch.arange(self.done[seq], self.done[seq] + r)) for seq, r in enumerate(rows) if r]
        pad, head_size = sc.padding_rows, fmt.head_size

        def rows_of(per_seq, heads):
            padding = random_rows(self.generator, pad, heads, head_size, fmt.dtype)
            return torch.cat([per_seq[s][p] for s, p in pick] + [padding])

        slots = torch.cat([self.slots_of(s, p) for s, p in pick] + [torch.full((pad,), -1, dtype=torch.long)])
        self.done = [d + r for d, r in zip(self.done, rows)]
        return StepBatch(rows_of(self.keys, sc.num_kv_heads), rows_of(self.values, sc.num_kv_heads),
                         rows_of(self.queries, sc.num_q_heads), slots, seq_lens, query_start_loc, block_table, ring_ids,
                         sc.query_bound or max(rows))


def run_scenario(ops: Ops, sc: Scenario) -> None:
    """Runs every step of `sc` on `ops` and the references; raises AssertionError on a difference."""
    fmt, device = sc.fmt, ops.device
    state = ScenarioState(sc, device)
    steps = max(len(c) for c in sc.chunks)
    for step in range(steps):
        b = state.step_batch(step)
        label = f"step {step}"
        d = {name: getattr(b, name).to(device) if getattr(b, name) is not None else None
             for name in ("key", "value", "query", "slots", "seq_lens", "query_start_loc", "block_table", "ring_ids")}

        expected_cache = state.cache.clone()
        kvref.quantize_and_cache_ref(b.key, b.value, expected_cache, b.slots, fmt, b.query_start_loc, b.seq_lens,
                                        state.ring, b.ring_ids)
        ops.quantize_and_cache(d["key"], d["value"], state.device_cache, d["slots"], d["query_start_loc"],
                               d["seq_lens"], state.device_ring, d["ring_ids"])
        actual_cache = state.device_cache.cpu()
        assert torch.equal(expected_cache, actual_cache), \
            f"{label}: {(expected_cache != actual_cache).sum()} cache bytes differ"
        state.cache = expected_cache

        scale = fmt.head_size**-0.5
        expected = kvref.paged_attention_ref(b.query, b.key, b.value, state.cache, b.block_table, b.seq_lens,
                                                b.query_start_loc, scale, fmt, state.ring, b.ring_ids, sc.softcap)
        out = torch.full_like(d["query"], float("nan"))
        ops.paged_attention(out, d["query"], d["key"], d["value"], state.device_cache, d["block_table"],
                            d["seq_lens"], d["query_start_loc"], b.max_query_len, scale, state.device_ring,
                            d["ring_ids"], sc.softcap)
        out = out.cpu()
        real = int(b.query_start_loc[-1])
        torch.testing.assert_close(out[:real].float(), expected[:real].float(), **TOLERANCE[fmt.dtype], msg=label)
        assert out[real:].isnan().all(), f"{label}: padding rows were written"

        if state.ring is not None:
            expected_ring = state.ring.clone()
            kvref.write_window_ref(b.key, b.value, expected_ring, b.ring_ids, b.query_start_loc, b.seq_lens, fmt)
            ops.write_window(d["key"], d["value"], state.device_ring, d["ring_ids"], d["query_start_loc"],
                             d["seq_lens"])
            actual_ring = state.device_ring.cpu()
            assert torch.equal(expected_ring.view(torch.uint8), actual_ring.view(torch.uint8)), f"{label}: ring differs"
            state.ring = expected_ring
