"""The CUDA kernels' logic, checked on the CPU: csrc/cuda's torch-free code (kernels, grids,
work split, launches) runs under a host emulator (cuda_emulator/: the threads of a block are
fibers, shuffles and __syncthreads are barriers) built with the debug checks on, and is
compared with the format.py references: cache and ring bytes bit for bit, attention at
kernel_cases.TOLERANCE, over multi-step scenarios (cuda_emulator/scenarios.py: chunked prefill,
decode, the ring carried between steps, mixed decode + prefill batches, padded entries, split
contexts). Where a GPU is present the same scenarios also run on the real kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_emulator import binding
from cuda_emulator.scenarios import SCENARIOS, TorchOps, layer, random_rows, run_scenario
from kernel_cases import CUDA

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    missing = binding.build_requirements()
    if missing:
        pytest.skip(f"the CUDA emulator needs g++ and the CUDA headers: {missing}")
    return binding.build(tmp_path_factory.mktemp("cuda_emulator"))


def no_sequences():
    loc = torch.zeros(1, dtype=torch.int32)
    return loc, loc[:0]


# ---------------------------------------------------------------------------------
# quantize_and_cache, per-token scheme: bytes against the reference
# ---------------------------------------------------------------------------------

QUANTIZE_CASES = [(d, g, bits, torch.bfloat16) for d, g in
                  [(64, 64), (64, 32), (128, 32), (128, 128), (256, 64), (80, 80), (96, 32), (96, 96)]
                  for bits in [(2, 4), (8, 16)]] + [
                     (128, 64, (4, 8), torch.float16), (64, 32, (16, 2), torch.float16),
                     (128, 64, (2, 16), torch.float32), (64, 64, (8, 4), torch.float32)]


@pytest.mark.parametrize("head_size,group_size,bits,dtype", QUANTIZE_CASES, ids=str)
def test_quantize_and_cache_bytes(emulator, head_size, group_size, bits, dtype):
    fmt = kvformat.LayerFormat(*bits, head_size, group_size, dtype)
    generator = torch.Generator().manual_seed(head_size + group_size)
    tokens, heads, block_size = 37, 3, 16
    fused = (torch.randn(tokens, 2 * heads * head_size + 8, generator=generator) * 3).to(dtype)
    key = fused[:, : heads * head_size].view(tokens, heads, head_size)  # token stride > H * D
    value = fused[:, heads * head_size : 2 * heads * head_size].view(tokens, heads, head_size)
    key[2, 1, :group_size] = 0.75  # a constant group
    num_blocks = 4
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    slots[[0, 9]] = -1
    expected = torch.randint(0, 256, fmt.cache_shape(num_blocks, heads, block_size), dtype=torch.uint8,
                             generator=generator)
    actual = expected.clone()
    kvref.quantize_and_cache_ref(key, value, expected, slots, fmt)
    binding.EmulatorOps(emulator, fmt).quantize_and_cache(key, value, actual, slots, *no_sequences())
    assert torch.equal(expected, actual), f"{(expected != actual).sum()} bytes differ"


# ---------------------------------------------------------------------------------
# Multi-step scenarios (cuda_emulator/scenarios.py)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(emulator, name):
    scenario = SCENARIOS[name]
    run_scenario(binding.EmulatorOps(emulator, scenario.fmt), scenario)


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("device", [CUDA])
def test_scenario_on_gpu(device, name):
    """The emulator's scenarios on the real kernels."""
    scenario = SCENARIOS[name]
    run_scenario(TorchOps(device, scenario.fmt), scenario)


def test_decode_contexts_are_split_next_to_a_prefill(emulator):
    """The split does not depend on the longest query: decodes sharing a step with a prefill chunk
    (the batches of the "window-mixed" scenario, whose outputs test_scenario checks) are split."""
    for num_tokens, max_query_len in [(3, 1), (43, 37), (2048 + 2, 2048)]:
        plan = binding.plan_attention(emulator, num_tokens, 3, 4, 2, 128, max_query_len)
        assert plan["num_partitions"] > 1, (num_tokens, max_query_len, plan)
        assert (plan["prefill_tiles"] > 0) == (max_query_len > 16), plan


# ---------------------------------------------------------------------------------
# The work split as Python sizes it, and the debug checks
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size", [(32, 8, 128), (9, 3, 64), (64, 1, 256), (40, 40, 80)])
def test_workspace_size_matches_the_plan(emulator, num_q_heads, num_kv_heads, head_size):
    largest = 0
    for num_seqs in [1, 2, 3, 7, 16, 33, 64, 127, 128, 129, 255, 256, 1000]:
        for max_query_len in [1, 2, 4, 5, 16, 17, 512]:
            plan = binding.plan_attention(emulator, num_seqs * max_query_len, num_seqs, num_q_heads, num_kv_heads,
                                          head_size, max_query_len)
            size = ops.attention_workspace_size(num_seqs, max_query_len, num_q_heads, num_kv_heads, head_size)
            assert plan["workspace_bytes"] == size, (num_seqs, max_query_len)
            largest = max(largest, size)
    assert 0 < largest <= ops.max_attention_workspace_size(num_q_heads, num_kv_heads, head_size) < 32 << 20


def small_batch(fmt, seq_len=20, block_size=16):
    """One sequence of seq_len positions in a cache written by the reference; the last row's K/V."""
    generator = torch.Generator().manual_seed(1)
    blocks = math.ceil(seq_len / block_size)
    cache = torch.zeros(fmt.cache_shape(blocks, 1, block_size), dtype=torch.uint8)
    key = random_rows(generator, seq_len, 1, fmt.head_size, fmt.dtype)
    value = random_rows(generator, seq_len, 1, fmt.head_size, fmt.dtype)
    table = torch.arange(blocks, dtype=torch.int32).view(1, -1)
    kvref.quantize_and_cache_ref(key, value, cache, torch.arange(seq_len), fmt)
    return cache, key[-1:], value[-1:], table


def test_debug_check_slot_past_the_cache(emulator):
    fmt = layer((4, 4), 64, 64)
    cache, key, value, _ = small_batch(fmt)
    with pytest.raises(RuntimeError, match="slot id past the cache"):
        binding.EmulatorOps(emulator, fmt).quantize_and_cache(key, value, cache, torch.tensor([cache.shape[0] * 16]),
                                                              *no_sequences())


@pytest.mark.parametrize("bad", ["block id", "query longer than seq_len", "query longer than max_query_len"])
def test_debug_check_attention_indices(emulator, bad):
    fmt = layer((4, 4), 64, 64)
    cache, key, value, table = small_batch(fmt)
    query = torch.randn(1, 2, 64).to(fmt.dtype)
    seq_lens, query_start_loc = torch.tensor([20], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    max_query_len = 1
    if bad == "block id":
        table[0, 0] = cache.shape[0]
        message = "block id out of range"
    else:
        query, key, value = (torch.cat([t, t]) for t in (query, key, value))
        query_start_loc[1] = 2
        if bad == "query longer than seq_len":
            seq_lens[0], max_query_len = 1, 2
            message = "query rows exceed its seq_len"
        else:
            message = "longer than max_query_len"
    emu = binding.EmulatorOps(emulator, fmt)
    out = torch.empty_like(query)
    with pytest.raises(RuntimeError, match=message):
        emu.paged_attention(out, query, key, value, cache, table, seq_lens, query_start_loc, max_query_len, 0.125)
    # The error is reported once; the next launch runs again.
    table[0, 0] = 0
    emu.paged_attention(out[:1], query[:1], key[:1], value[:1], cache, table, torch.tensor([20], dtype=torch.int32),
                        torch.tensor([0, 1], dtype=torch.int32), 1, 0.125)
