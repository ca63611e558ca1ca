"""paged_attention's prefill route (csrc/cpu/prefill_attention.*) against reference.paged_attention_ref.

The route computes Q.K^T and P.V on the CPU's matrix units (AMX, or AVX512-BF16 dot products)
from bfloat16 operands with fp32 accumulation. Against the fp32 reference it rounds two things:
the values read from the pages (once, relative error at most u = 2^-8) and the probabilities
(once, u), the softmax sum adding the same rounded probabilities; quantized keys are not rounded
(they enter the scores as two bf16 parts, prefill_tiles.h), and the query, the ring and the
step's own rows are bf16 already. So outputs are compared by kernel_cases.check_bf16_rows with
Roundings(probs=u, packed_values=u) against the fp32 reference of the same bf16 inputs (its
docstring derives the bound). Over the batches below the largest row error is ~0.25 of that
bound, while one key dropped out of 3000 errs ~12-28x it and a 16-key tile ~30x
(test_dropped_key_or_tile_fails). fp16 and fp32 layers stay on the vector kernel, checked with
kernel_cases.TOLERANCE.

Sequences take the route by query rows (tokens x query heads per KV head); the tests lower the
threshold (KVTUNER_PREFILL_MIN_ROWS=1) so that every sequence of a batch takes it, decodes and
1-token chunks included, and name the unit (KVTUNER_PREFILL_ISA); every call asserts the route
it took (ops.cpu_routes). Units the CPU lacks are skipped. kernel_cases.make_batch writes each
sequence's history the way a server does (an earlier step's quantize_and_cache and
write_window), then the step's own rows.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from kernel_cases import (
    ATTENTION_BIT_PAIRS,
    BF16_UNIT,
    TOLERANCE,
    Roundings,
    bf16_reference,
    check_bf16_rows,
    make_batch,
    reference_attention,
)

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops

UNITS = [
    pytest.param("amx", marks=pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="no AMX")),
    pytest.param("avx512_bf16",
                 marks=pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="no AVX512-BF16")),
]

# (seq_len, query_len): a whole prompt, chunks starting mid-block and at a block start, a decode,
# a short chunk, a 1-token prompt.
RAGGED = [(97, 97), (200, 77), (128, 64), (70, 1), (150, 17), (1, 1)]


PREFILL_ROUNDINGS = Roundings(probs=BF16_UNIT, packed_values=BF16_UNIT)
VECTOR_ROUNDINGS = Roundings()  # fp32 throughout


@pytest.fixture(params=UNITS)
def unit(request, monkeypatch):
    monkeypatch.setenv("KVTUNER_PREFILL_ISA", request.param)
    monkeypatch.setenv("KVTUNER_PREFILL_MIN_ROWS", "1")
    return request.param


def run_step(batch, scale, softcap=None) -> tuple[torch.Tensor, ops.CpuRoutes]:
    """The op's output on the batch, and the routes it took."""
    out = torch.full_like(batch.query, float("nan"))
    ops.reset_cpu_routes()
    ops.paged_attention(out, batch.query, batch.key, batch.value, batch.kv_cache, batch.block_table, batch.seq_lens,
                        batch.query_start_loc, batch.max_query_len, batch.max_seq_len, scale, batch.fmt,
                        batch.ring_cache, batch.ring_block_ids, softcap)
    return out, ops.cpu_routes()


def check_step(fmt, sequences, num_q_heads, num_kv_heads, block_size, unit, softcap=None, seed=0):
    """One step over the batch of (seq_len, query_len) pairs, every sequence on the route of `unit`
    (None: the vector kernel), against the reference."""
    batch = make_batch(fmt, [length for length, _ in sequences], [rows for _, rows in sequences], num_q_heads,
                       num_kv_heads, block_size, seed)
    scale = fmt.head_size**-0.5
    out, routes = run_step(batch, scale, softcap)
    route = f"prefill_{unit}" if unit else "vector"
    assert routes.taken() == {route}, routes
    assert routes.sequences[route] == sum(rows > 0 for _, rows in sequences)
    if fmt.dtype == torch.bfloat16:
        check_bf16_rows(out, bf16_reference(batch, scale, PREFILL_ROUNDINGS if unit else VECTOR_ROUNDINGS, softcap))
    else:
        torch.testing.assert_close(out.float(), reference_attention(batch, scale, softcap).float(),
                                   **TOLERANCE[fmt.dtype])


# Every bit pair without a window; windows of 32 and of the whole block (64) with a few.
PER_TOKEN_CASES = [(k, v, 0) for k, v in ATTENTION_BIT_PAIRS] + [(4, 4, 32), (8, 2, 32), (2, 8, 64), (16, 4, 64),
                                                                 (4, 2, 64)]


@pytest.mark.parametrize("key_bits,value_bits,residual_length", PER_TOKEN_CASES)
def test_per_token_groups(key_bits, value_bits, residual_length, unit):
    fmt = kvformat.LayerFormat(key_bits, value_bits, 64, 32, torch.bfloat16, residual_length=residual_length)
    check_step(fmt, RAGGED, num_q_heads=9, num_kv_heads=3, block_size=64, unit=unit)


@pytest.mark.parametrize(
    "key_bits,value_bits,key_group_size,residual_length",
    [(4, 4, 16, 16), (2, 8, 16, 64), (8, 2, 32, 32), (4, 4, 32, 64), (2, 2, 64, 64), (4, 16, 32, 32)],
)
def test_kivi_keys(key_bits, value_bits, key_group_size, residual_length, unit):
    fmt = kvformat.LayerFormat(key_bits, value_bits, 64, 32, torch.bfloat16, kvformat.KIVI, key_group_size,
                               residual_length)
    check_step(fmt, RAGGED, num_q_heads=9, num_kv_heads=3, block_size=64, unit=unit)


@pytest.mark.parametrize("scheme", [kvformat.PER_TOKEN, kvformat.KIVI])
@pytest.mark.parametrize("head_size,group_size", [(64, 64), (96, 32), (128, 32), (128, 128), (256, 64)])
def test_head_and_group_sizes(head_size, group_size, scheme, unit):
    key_group_size = 32 if scheme == kvformat.KIVI else 0
    fmt = kvformat.LayerFormat(4, 2, head_size, group_size, torch.bfloat16, scheme, key_group_size, 32)
    check_step(fmt, [(200, 120), (45, 45), (90, 3)], num_q_heads=4, num_kv_heads=2, block_size=32, unit=unit)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (16, 2), (8, 1), (40, 8), (64, 1)])
def test_gqa_ratios(num_q_heads, num_kv_heads, unit):
    fmt = kvformat.LayerFormat(4, 4, 64, 32, torch.bfloat16, residual_length=32)
    check_step(fmt, [(150, 150), (180, 33), (40, 1)], num_q_heads, num_kv_heads, block_size=32, unit=unit)


@pytest.mark.parametrize("block_size,residual_length", [(16, 0), (16, 16), (128, 32), (128, 128)])
def test_block_sizes(block_size, residual_length, unit):
    """Key tiles of 128 positions span several 16-position blocks; 128-position blocks hold a tile."""
    fmt = kvformat.LayerFormat(8, 4, 128, 64, torch.bfloat16, residual_length=residual_length)
    check_step(fmt, [(600, 600), (700, 150), (260, 5)], num_q_heads=8, num_kv_heads=2, block_size=block_size,
               unit=unit)


@pytest.mark.parametrize("scheme", [kvformat.PER_TOKEN, kvformat.KIVI])
def test_softcap(scheme, unit):
    key_group_size = 16 if scheme == kvformat.KIVI else 0
    fmt = kvformat.LayerFormat(4, 4, 64, 64, torch.bfloat16, scheme, key_group_size, 16)
    check_step(fmt, RAGGED, num_q_heads=4, num_kv_heads=2, block_size=32, unit=unit, softcap=30.0)


@contextmanager
def torch_threads(count):
    """The kernels plan their items for torch's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_long_prompts_on_one_thread(unit):
    """One thread: items of the largest size (128 tokens x 3 query heads), many key tiles each."""
    fmt = kvformat.LayerFormat(4, 4, 64, 64, torch.bfloat16, kvformat.KIVI, 32, 32)
    with torch_threads(1):
        check_step(fmt, [(1024, 1024), (900, 260)], num_q_heads=9, num_kv_heads=3, block_size=128, unit=unit)


@pytest.mark.parametrize("scheme,residual_length", [(kvformat.PER_TOKEN, 0), (kvformat.PER_TOKEN, 64),
                                                    (kvformat.KIVI, 32)])
def test_key_partitions(scheme, residual_length, unit):
    """Short chunks over long contexts on 8 threads: the keys of the three longest are split into 2
    or 3 partitions of whole key tiles, merged by the vector kernel's reduce_partitions."""
    key_group_size = 32 if scheme == kvformat.KIVI else 0
    fmt = kvformat.LayerFormat(4, 8, 64, 32, torch.bfloat16, scheme, key_group_size, residual_length)
    with torch_threads(8):
        check_step(fmt, [(2000, 20), (1500, 1), (1300, 7), (40, 40)], num_q_heads=9, num_kv_heads=3, block_size=64,
                   unit=unit)


@pytest.mark.parametrize("dtype,head_size", [(torch.float16, 64), (torch.float32, 64), (torch.bfloat16, 80)], ids=str)
def test_unsupported_layers_stay_on_the_vector_kernel(dtype, head_size, unit):
    """The route takes bfloat16 models with head sizes of 32k only: fp32 must keep fp32 accuracy,
    which bf16 operands would lose; head size 80 must still be computed (by the vector kernel)."""
    fmt = kvformat.LayerFormat(4, 4, head_size, head_size if head_size == 80 else 32, dtype)
    check_step(fmt, [(130, 130), (60, 20)], num_q_heads=4, num_kv_heads=2, block_size=16, unit=None)


def test_default_routing_mixes_both_kernels(monkeypatch):
    """Without the prefill overrides: the prompt and the 40-token chunk take the route (where the
    CPU has a unit), the decodes stay on the vector kernel (KVTUNER_DECODE_ISA=off keeps them off
    the AMX decode kernel), in one batch."""
    monkeypatch.setenv("KVTUNER_DECODE_ISA", "off")
    fmt = kvformat.LayerFormat(4, 4, 64, 32, torch.bfloat16)
    batch = make_batch(fmt, [1, 300, 400, 90, 200], [1, 1, 400, 1, 40], num_q_heads=9, num_kv_heads=3, block_size=16)
    out, routes = run_step(batch, 0.125)
    if routes.matrix_unit == "none":
        assert routes.taken() == {"vector"}
    else:
        assert routes.taken() == {"vector", f"prefill_{routes.matrix_unit}"}
        assert routes.sequences[f"prefill_{routes.matrix_unit}"] == 2 and routes.sequences["vector"] == 3
    # the decodes' rows are exact but for their fp32 sums; the routed ones round as the route does
    check_bf16_rows(out, bf16_reference(batch, 0.125, PREFILL_ROUNDINGS))


def test_dropped_key_or_tile_fails(unit):
    """check_bf16_rows passes the kernel's output against its own reference and fails it against
    one without a key, or without a 16-key tile, out of 3000: a kernel that skipped them would fail."""
    fmt = kvformat.LayerFormat(4, 4, 64, 32, torch.bfloat16)
    batch = make_batch(fmt, [3000], [32], num_q_heads=9, num_kv_heads=3, block_size=64)
    out, routes = run_step(batch, 0.125)
    assert routes.taken() == {f"prefill_{unit}"}
    ref = bf16_reference(batch, 0.125, PREFILL_ROUNDINGS)
    check_bf16_rows(out, ref)
    for dropped in ([1500], list(range(1024, 1040))):
        with pytest.raises(AssertionError, match="its bound"):
            check_bf16_rows(out, ref, ref.without_keys(dropped))
