"""Results depend on positions only: the same sequence run step by step in different chunkings
(quantize_and_cache -> paged_attention -> write_window per step, the caches and rings carried
from step to step) gives what reference.simulated_attention computes for the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import DEVICES, TOLERANCE, layer_format

from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref

LENGTH, BLOCK_SIZE, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE = 300, 32, 6, 2, 64

# Chunk lengths of each sequence, all run in one batch; a sequence drops out once it is done.
CHUNKINGS = {
    "prefill": [LENGTH],
    "across-blocks": [50] * 6,
    "mid-block": [7, 45, 100, 13, 135],
    "prefill-then-decode": [200] + [1] * 100,
    "decode-mixed": [1] * 40 + [64, 3, 1, 17] + [1] * 20 + [155],
}

FORMATS = {
    "per-token": dict(bits=(4, 2), group_size=32),
    "per-token-window": dict(bits=(4, 4), group_size=64, window=5),
    "per-token-block-window": dict(bits=(8, 2), group_size=32, window=BLOCK_SIZE),
    "kivi": dict(bits=(2, 4), group_size=32, window=16, key_group_size=16),
    "kivi-wide": dict(bits=(4, 8), group_size=64, window=24, key_group_size=16),
    "kivi-group-block": dict(bits=(4, 4), group_size=32, window=32, key_group_size=32),
    "value16-window": dict(bits=(16, 4), group_size=32, window=8),
    "unquantized": dict(bits=(16, 16), group_size=64),
}


def run_in_steps(fmt, query, key, value, chunkings, device) -> torch.Tensor:
    """query [S, T, Hq, D], key/value [S, T, Hkv, D]; returns the op's outputs [S, T, Hq, D]."""
    num_seqs = len(chunkings)
    blocks_per_seq = math.ceil(LENGTH / BLOCK_SIZE)
    generator = torch.Generator().manual_seed(1)
    block_table = torch.randperm(num_seqs * blocks_per_seq, generator=generator).view(num_seqs, -1).int().to(device)
    kv_cache = torch.zeros(fmt.cache_shape(num_seqs * blocks_per_seq, NUM_KV_HEADS, BLOCK_SIZE), dtype=torch.uint8,
                           device=device)
    ring_cache = torch.zeros(fmt.ring_shape(num_seqs, NUM_KV_HEADS), dtype=fmt.dtype, device=device)
    ring_ids = torch.arange(num_seqs - 1, -1, -1, dtype=torch.int32, device=device)
    out = torch.full_like(query, float("nan"))
    done = [0] * num_seqs
    for step in range(max(map(len, chunkings))):
        active = [s for s in range(num_seqs) if step < len(chunkings[s])]
        rows = [chunkings[s][step] for s in active]
        spans = [(s, done[s], done[s] + n) for s, n in zip(active, rows, strict=True)]
        step_rows = [slice(begin, end) for _, begin, end in spans]
        q = torch.cat([query[s, r] for (s, _, _), r in zip(spans, step_rows, strict=True)]).to(device)
        k = torch.cat([key[s, r] for (s, _, _), r in zip(spans, step_rows, strict=True)]).to(device)
        v = torch.cat([value[s, r] for (s, _, _), r in zip(spans, step_rows, strict=True)]).to(device)
        positions = torch.cat([torch.arange(begin, end) for _, begin, end in spans]).to(device)
        seq_index = torch.cat([torch.full((end - begin,), s) for s, begin, end in spans]).to(device)
        slots = block_table[seq_index, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
        seq_lens = torch.tensor([end for _, _, end in spans], dtype=torch.int32, device=device)
        query_start_loc = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device=device)
        step_ring_ids = ring_ids[active] if fmt.has_window else None
        step_ring = ring_cache if fmt.has_window else None
        step_out = torch.empty_like(q)
        ops.quantize_and_cache(k, v, kv_cache, slots, fmt, query_start_loc, seq_lens, step_ring, step_ring_ids)
        ops.paged_attention(step_out, q, k, v, kv_cache, block_table[active], seq_lens, query_start_loc, max(rows),
                            int(seq_lens.max()), HEAD_SIZE**-0.5, fmt, step_ring, step_ring_ids)
        if fmt.has_window:
            ops.write_window(k, v, ring_cache, step_ring_ids, query_start_loc, seq_lens, fmt)
        for (s, begin, end), first in zip(spans, query_start_loc.tolist()[:-1], strict=True):
            out[s, begin:end] = step_out[first : first + end - begin].cpu()
            done[s] = end
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FORMATS))
def test_chunkings_match_whole_sequence(name, device):
    spec = FORMATS[name]
    fmt = layer_format(*spec["bits"], HEAD_SIZE, spec["group_size"], torch.float32, window=spec.get("window", 0),
                       key_group_size=spec.get("key_group_size", 0))
    chunkings = list(CHUNKINGS.values())
    assert all(sum(chunks) == LENGTH for chunks in chunkings)
    generator = torch.Generator().manual_seed(0)
    num_seqs = len(chunkings)
    query = torch.randn(num_seqs, LENGTH, NUM_Q_HEADS, HEAD_SIZE, generator=generator)
    key = torch.randn(num_seqs, LENGTH, NUM_KV_HEADS, HEAD_SIZE, generator=generator) + 2 * torch.randn(
        NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    value = torch.randn(num_seqs, LENGTH, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    actual = run_in_steps(fmt, query, key, value, chunkings, device)
    expected = kvref.simulated_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), fmt,
                                            BLOCK_SIZE, HEAD_SIZE**-0.5).transpose(1, 2)
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
