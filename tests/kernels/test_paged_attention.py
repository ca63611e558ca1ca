"""paged_attention against reference.paged_attention_ref (same packed, ring and fresh inputs, tight
tolerance) and against unquantized fp32 attention (within the error the quantization can cause)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import (
    ATTENTION_BIT_PAIRS,
    DEVICES,
    TOLERANCE,
    PagedBatch,
    Roundings,
    bf16_reference,
    check_bf16_rows,
    layer_format,
    make_batch,
    reference_attention,
)

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref

# 17 sequences of mixed lengths (1 token, partial and full blocks, several blocks).
RAGGED_SEQ_LENS = [1, 54, 97, 16, 17, 128, 129, 300, 2, 33, 64, 250, 5, 111, 200, 31, 77]


@pytest.fixture(autouse=True)
def narrower_build_ran():
    """In test_narrower_cpu_kernels' subprocess (KVTUNER_CPU_ISA set): every CPU call of each test
    ran on the vector kernel, built for that ISA."""
    isa = os.environ.get("KVTUNER_CPU_ISA")
    if isa:
        ops.reset_cpu_routes()
    yield
    if isa:
        routes = ops.cpu_routes()
        assert routes.vector_isa == isa and routes.taken() <= {"vector"}, routes


def run_op(batch: PagedBatch, device: str, softcap=None, scale=None, workspace=None, padding=0) -> torch.Tensor:
    """The op's output rows of the batch's sequences; `padding` extra rows past them (as vLLM pads
    the token dimension) must stay untouched."""
    batch = batch.to(device)
    scale = scale if scale is not None else batch.fmt.head_size**-0.5

    def padded(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, torch.randn(padding, *rows.shape[1:], device=device).to(rows.dtype)])

    query, key, value = padded(batch.query), padded(batch.key), padded(batch.value)
    out = torch.full_like(query, float("nan"))
    ops.paged_attention(out, query, key, value, batch.kv_cache, batch.block_table, batch.seq_lens,
                        batch.query_start_loc, batch.max_query_len, batch.max_seq_len, scale, batch.fmt,
                        batch.ring_cache, batch.ring_block_ids, softcap, workspace)
    assert out[len(batch.query) :].isnan().all(), "rows past the last sequence were written"
    return out[: len(batch.query)].cpu()


def check_against_reference(batch: PagedBatch, device: str, softcap=None, **kwargs) -> None:
    expected = reference_attention(batch, batch.fmt.head_size**-0.5, softcap)
    actual = run_op(batch, device, softcap, **kwargs)
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[batch.fmt.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [0, 5, "block"])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("key_bits,value_bits", ATTENTION_BIT_PAIRS)
def test_decode_ragged_batch(key_bits, value_bits, block_size, window, device):
    window = block_size if window == "block" else window
    fmt = layer_format(key_bits, value_bits, 128, 64, torch.bfloat16, window=window)
    batch = make_batch(fmt, RAGGED_SEQ_LENS, [1] * len(RAGGED_SEQ_LENS), num_q_heads=8, num_kv_heads=2,
                       block_size=block_size)
    check_against_reference(batch, device, padding=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_bits,value_bits,block_size,window", [(4, 4, 128, 0), (8, 4, 16, 16), (2, 4, 128, 32),
                                                                   (16, 16, 128, 0)])
def test_long_context(key_bits, value_bits, block_size, window, device):
    """A 2048-token sequence among short ones: its keys are split into partitions and merged."""
    fmt = layer_format(key_bits, value_bits, 128, 64, torch.bfloat16, window=window)
    seq_lens, query_lens = [2048, 1, 97, 54, 1000], [1, 1, 1, 20, 3]
    batch = make_batch(fmt, seq_lens, query_lens, num_q_heads=4, num_kv_heads=1, block_size=block_size)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(kvformat.SUPPORTED_DTYPES), ids=str)
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize(
    "seq_lens,query_lens",
    [
        ([97, 300, 54], [97, 300, 54]),  # prefill (300: a long-query sequence)
        ([97, 300, 54], [40, 33, 1]),  # chunked prefill / prefix hit next to a decode
        ([130, 1, 17, 64, 200], [1, 1, 17, 2, 0]),  # decode, 1-token prompt, prefill, 2-token spec step, idle
    ],
    ids=["prefill", "chunked", "mixed"],
)
def test_prefill_and_chunked(seq_lens, query_lens, scheme, dtype, device):
    key_group_size = 16 if scheme == "kivi" else 0
    fmt = layer_format(4, 2, 128, 32, dtype, window=24, key_group_size=key_group_size)
    batch = make_batch(fmt, seq_lens, query_lens, num_q_heads=4, num_kv_heads=2, block_size=32)
    check_against_reference(batch, device)


SHAPES = [(d, g) for d in (64, 128, 256) for g in (32, 64, 128) if d % g == 0] + [(80, 80), (96, 32), (96, 96)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_size,group_size", SHAPES)
def test_head_and_group_sizes(head_size, group_size, device):
    for key_bits, value_bits, key_group_size in [(8, 4, 0), (2, 4, 16), (4, 2, 32)]:
        fmt = layer_format(key_bits, value_bits, head_size, group_size, torch.float16, window=32,
                           key_group_size=key_group_size)
        batch = make_batch(fmt, [70, 200, 9], [1, 30, 9], num_q_heads=4, num_kv_heads=2, block_size=32)
        check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2), (16, 2), (8, 1), (40, 8), (64, 1)])
def test_gqa_ratios(num_q_heads, num_kv_heads, device):
    fmt = layer_format(4, 4, 64, 32, torch.bfloat16, window=7)
    batch = make_batch(fmt, [150, 33, 1], [1, 12, 1], num_q_heads, num_kv_heads, block_size=32)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_group_size", [16, 32, 64])
@pytest.mark.parametrize("window_over_group", [1, 2])
def test_kivi_key_groups(key_group_size, window_over_group, device):
    """Steps that start and end inside key groups, with the window at or above the group."""
    fmt = layer_format(2, 4, 64, 32, torch.float32, window=key_group_size * window_over_group,
                       key_group_size=key_group_size)
    seq_lens, query_lens = [300, 130, 77, 64, 200, 129], [1, 40, 77, 3, 70, 1]
    batch = make_batch(fmt, seq_lens, query_lens, num_q_heads=6, num_kv_heads=2, block_size=128)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,softcap", [(0, 30.0), (16, 50.0), (1, 5.0)])
def test_softcap(window, softcap, device):
    fmt = layer_format(8, 2, 128, 64, torch.float32, window=window)
    batch = make_batch(fmt, [300, 64, 1000, 5], [1, 64, 50, 2], num_q_heads=4, num_kv_heads=2, block_size=16)
    check_against_reference(batch, device, softcap)


@pytest.mark.parametrize("device", DEVICES)
def test_workspace(device):
    """A large enough workspace holds the split-key partials; a small one is ignored."""
    fmt = layer_format(4, 4, 64, 32, torch.float32, window=16)
    batch = make_batch(fmt, [3000, 5], [1, 1], num_q_heads=4, num_kv_heads=2, block_size=16)
    for floats in (1 << 20, 3):
        workspace = torch.full((floats,), float("nan"), device=device)
        check_against_reference(batch, device, workspace=workspace)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_out(device):
    """query/key/value as views of a fused qkv projection and out as a view with a larger token stride."""
    fmt = layer_format(4, 8, 64, 64, torch.bfloat16, window=16)
    batch = make_batch(fmt, [40, 90], [3, 1], num_q_heads=4, num_kv_heads=2, block_size=16)
    expected = reference_attention(batch, 0.125)
    qkv = torch.randn(4, 4 + 2 + 2, 64, device=device).to(torch.bfloat16)
    qkv[:, :4], qkv[:, 4:6], qkv[:, 6:] = batch.query.to(device), batch.key.to(device), batch.value.to(device)
    out_storage = torch.zeros(4, 6, 64, dtype=torch.bfloat16, device=device)
    b = batch.to(device)
    ops.paged_attention(out_storage[:, 1:5], qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], b.kv_cache, b.block_table,
                        b.seq_lens, b.query_start_loc, 3, 90, 0.125, fmt, b.ring_cache, b.ring_block_ids)
    torch.testing.assert_close(out_storage[:, 1:5].cpu().float(), expected.float(), **TOLERANCE[torch.bfloat16])
    assert out_storage[:, [0, 5]].abs().sum() == 0  # nothing written outside the view


def unquantized_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Causal attention in fp32 over the K/V as given to the writers (no quantization)."""
    num_q_heads, num_kv_heads = batch.query.shape[1], batch.keys[0].shape[1]
    out = torch.empty(batch.query.shape)
    for seq, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
        start, end = int(batch.query_start_loc[seq]), int(batch.query_start_loc[seq + 1])
        k = key.float().transpose(0, 1).repeat_interleave(num_q_heads // num_kv_heads, 0)
        v = value.float().transpose(0, 1).repeat_interleave(num_q_heads // num_kv_heads, 0)
        q = batch.query[start:end].float().transpose(0, 1)
        scores = q @ k.transpose(1, 2) * scale
        positions = torch.arange(key.shape[0] - (end - start), key.shape[0]).unsqueeze(-1)
        scores = scores.masked_fill(torch.arange(key.shape[0]) > positions, -math.inf)
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


def quantization_error_bound(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Per (token, head, channel) bound on |attention(K^, V^) - attention(K, V)|.

    With exact probabilities p and perturbed ones p^ = softmax(s + e), |e_j| <= eps:
      o^ - o = sum_j p^_j (v^_j - v_j) + sum_j (p^_j - p_j)(v_j - c)   for any constant c,
    so |o^ - o| <= max_j |v^_j - v_j| + ||p^ - p||_1 * max_j |v_j - c|. Each p^_j / p_j lies
    in [e^-2eps, e^2eps], hence ||p^ - p||_1 <= min(2, e^(2 eps) - 1); c = the channel's
    mid-range makes max_j |v_j - c| half its range. The maxima run over the keys the query
    reads from the packed pages (j < w0(p)); window keys are exact, so they add nothing.
    eps = scale * max_j |q . (k^_j - k_j)| is measured per query row from the dequantized keys.
    """
    num_q_heads, num_kv_heads = batch.query.shape[1], batch.keys[0].shape[1]
    group = num_q_heads // num_kv_heads
    bound = torch.empty(batch.query.shape)
    for seq, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
        start, end = int(batch.query_start_loc[seq]), int(batch.query_start_loc[seq + 1])
        length = key.shape[0]
        key_hat, value_hat = kvref.read_cache_ref(batch.kv_cache, batch.block_table[seq], length, batch.fmt)
        key_error = (key_hat - key.float().transpose(0, 1)).repeat_interleave(group, 0)  # [Hq, L, D]
        value_error = (value_hat - value.float().transpose(0, 1)).abs().repeat_interleave(group, 0)  # [Hq, L, D]
        value_range = value.float().amax(0) - value.float().amin(0)  # [Hkv, D]
        half_range = value_range.repeat_interleave(group, 0) / 2  # [Hq, D]
        positions = torch.arange(length - (end - start), length)
        packed = torch.arange(length) < kvref.window_start(positions, batch.block_size, batch.fmt.window)[:, None]
        q = batch.query[start:end].float().transpose(0, 1)  # [Hq, q_len, D]
        score_error = (q @ key_error.transpose(1, 2)).abs() * scale  # [Hq, q_len, L]
        eps = score_error.masked_fill(~packed, 0).amax(-1)  # [Hq, q_len]
        spread = torch.clamp(torch.expm1(2 * eps), max=2.0)
        worst_value = torch.stack([value_error[:, row_packed].amax(1) if row_packed.any()
                                   else torch.zeros_like(half_range) for row_packed in packed], 1)  # [Hq, q_len, D]
        per_row = worst_value + spread.unsqueeze(-1) * half_range.unsqueeze(1)
        bound[start:end] = per_row.transpose(0, 1)
    return bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,key_group_size", [(0, 0), (16, 0), (16, 16)])
@pytest.mark.parametrize("key_bits,value_bits", ATTENTION_BIT_PAIRS)
def test_close_to_unquantized_attention(key_bits, value_bits, window, key_group_size, device):
    fmt = layer_format(key_bits, value_bits, 64, 32, torch.float32, window=window, key_group_size=key_group_size)
    batch = make_batch(fmt, [200, 31, 64], [1, 31, 4], num_q_heads=4, num_kv_heads=2, block_size=32, seed=3)
    scale = 64**-0.5
    error = (run_op(batch, device) - unquantized_attention(batch, scale)).abs()
    slack = 1e-5  # fp32 arithmetic of the two computations
    assert (error <= quantization_error_bound(batch, scale) + slack).all(), f"max error {error.max():.4g}"
    if (key_bits, value_bits) == (16, 16):
        assert error.max() <= slack


def raw_call(batch: PagedBatch, **overrides):
    """torch.ops.kvtuner.paged_attention with the batch's arguments, some replaced."""
    fmt = batch.fmt
    args = dict(out=torch.empty_like(batch.query), query=batch.query, key=batch.key, value=batch.value,
                kv_cache=batch.kv_cache, ring_cache=batch.ring_cache, ring_block_ids=batch.ring_block_ids,
                block_table=batch.block_table, seq_lens=batch.seq_lens, query_start_loc=batch.query_start_loc,
                max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, scale=0.125,
                key_bits=fmt.key_bits, value_bits=fmt.value_bits, group_size=fmt.group_size,
                key_group_size=fmt.kernel_key_group_size, residual_length=fmt.window, softcap=0.0, workspace=None)
    args.update(overrides)
    ops.load_kernels()
    torch.ops.kvtuner.paged_attention(*args.values())


def test_rejects_bad_arguments():
    fmt = layer_format(4, 4, 64, 64, torch.bfloat16, window=8)
    batch = make_batch(fmt, [10, 40], [1, 3], num_q_heads=3, num_kv_heads=1, block_size=16)
    with pytest.raises(RuntimeError, match="bytes per token"):
        raw_call(batch, key_bits=8)
    with pytest.raises(RuntimeError, match="must be a multiple of KV heads"):
        raw_call(batch, kv_cache=batch.kv_cache[:, [0, 0]], key=batch.key[:, [0, 0]], value=batch.value[:, [0, 0]])
    with pytest.raises(RuntimeError, match="block_table must be int32"):
        raw_call(batch, block_table=batch.block_table.long())
    with pytest.raises(RuntimeError, match="needs ring_cache and ring_block_ids"):
        raw_call(batch, ring_cache=None)


def test_rejects_out_of_bounds_indices():
    fmt = layer_format(4, 4, 64, 64, torch.bfloat16, window=8)
    batch = make_batch(fmt, [10, 40], [1, 3], num_q_heads=3, num_kv_heads=1, block_size=16)
    num_blocks = batch.kv_cache.shape[0]
    bad_table = batch.block_table.clone()
    bad_table[1, 2] = num_blocks
    with pytest.raises(RuntimeError, match=r"block_table\[1, 2\] = .* outside the cache"):
        raw_call(batch, block_table=bad_table)
    with pytest.raises(RuntimeError, match="needs 3 blocks, the block table has 2"):
        raw_call(batch, block_table=batch.block_table[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="query_len must be <= seq_len"):
        raw_call(batch, seq_lens=torch.tensor([10, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="query_start_loc ends at 4 but query has only 3 rows"):
        raw_call(batch, query=batch.query[:3], out=torch.empty_like(batch.query[:3]))
    with pytest.raises(RuntimeError, match="query_start_loc must not decrease"):
        raw_call(batch, query_start_loc=torch.tensor([0, 3, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"ring_block_ids\[0\] = -1 lies outside"):
        raw_call(batch, ring_block_ids=torch.tensor([-1, 0], dtype=torch.int32))


def test_opcheck():
    fmt = layer_format(8, 4, 64, 32, torch.bfloat16, window=16, key_group_size=16)
    batch = make_batch(fmt, [40, 7], [2, 7], num_q_heads=4, num_kv_heads=2, block_size=16)
    ops.load_kernels()
    torch.library.opcheck(
        torch.ops.kvtuner.paged_attention.default,
        (torch.empty_like(batch.query), batch.query, batch.key, batch.value, batch.kv_cache, batch.ring_cache,
         batch.ring_block_ids, batch.block_table, batch.seq_lens, batch.query_start_loc, 7, 40, 0.125, 8, 4, 32, 16,
         16, 0.0, torch.empty(4096)),
    )


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_cpu_kernels(isa):
    """The AVX2 and baseline builds of the vector kernel (the CPU picks the widest it has; CI
    machines may lack AVX-512) pass this file's reference comparisons too, every sequence on them
    (KVTUNER_PREFILL_ISA=off, as on a CPU without AVX-512; narrower_build_ran asserts it)."""
    env = {**os.environ, "KVTUNER_CPU_ISA": isa, "KVTUNER_PREFILL_ISA": "off"}
    selected = "decode_ragged_batch and 128- or prefill_and_chunked or head_and_group or kivi_key_groups or softcap"
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                             "-k", f"({selected}) and cpu"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_vector_kernel_misses_no_key(monkeypatch):
    """The vector kernel in bf16 (fp32 inside: Roundings()) against its reference and against one
    without a key, or without a 16-key tile, out of 3000: kernel_cases.check_bf16_rows must fail the
    latter (see its module docstring)."""
    monkeypatch.setenv("KVTUNER_DECODE_ISA", "off")
    fmt = layer_format(4, 4, 64, 32)
    batch = make_batch(fmt, [3000], [1], num_q_heads=9, num_kv_heads=3, block_size=128)
    ops.reset_cpu_routes()
    out = run_op(batch, "cpu")
    assert ops.cpu_routes().taken() == {"vector"}
    ref = bf16_reference(batch, 0.125, Roundings())
    check_bf16_rows(out, ref)
    for dropped in ([1500], list(range(1024, 1040))):
        with pytest.raises(AssertionError, match="its bound"):
            check_bf16_rows(out, ref, ref.without_keys(dropped))
