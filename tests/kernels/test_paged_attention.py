"""paged_attention against format.paged_attention_ref (same dequantized cache, tight tolerance)
and against unquantized fp32 attention (within the error the quantization can cause)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import ATTENTION_BIT_PAIRS, DEVICES, TOLERANCE, PagedBatch, make_batch, reference_attention

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops

# 17 sequences of mixed lengths (1 token, partial and full blocks, several blocks).
RAGGED_SEQ_LENS = [1, 54, 97, 16, 17, 128, 129, 300, 2, 33, 64, 250, 5, 111, 200, 31, 77]


def run_op(batch: PagedBatch, device: str, sliding_window=None, softcap=None, scale=None) -> torch.Tensor:
    batch = batch.to(device)
    scale = scale if scale is not None else batch.fmt.head_size**-0.5
    out = torch.full_like(batch.query, float("nan"))
    ops.paged_attention(out, batch.query, batch.kv_cache, batch.block_table, batch.seq_lens,
                        batch.query_start_loc, batch.max_query_len, batch.max_seq_len, scale, batch.fmt,
                        sliding_window, softcap)
    return out.cpu()


def check_against_reference(batch: PagedBatch, device: str, sliding_window=None, softcap=None) -> None:
    scale = batch.fmt.head_size**-0.5
    expected = reference_attention(batch, scale, sliding_window, softcap)
    actual = run_op(batch, device, sliding_window, softcap)
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[batch.fmt.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("key_bits,value_bits", ATTENTION_BIT_PAIRS)
def test_decode_ragged_batch(key_bits, value_bits, block_size, device):
    fmt = kvformat.LayerFormat(key_bits, value_bits, 128, 64, torch.bfloat16)
    batch = make_batch(fmt, RAGGED_SEQ_LENS, [1] * len(RAGGED_SEQ_LENS), num_q_heads=8, num_kv_heads=2,
                       block_size=block_size)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_bits,value_bits,block_size", [(4, 4, 128), (8, 4, 16), (16, 16, 128)])
def test_long_context(key_bits, value_bits, block_size, device):
    """A 2048-token sequence among short ones: its keys are split into partitions and merged."""
    fmt = kvformat.LayerFormat(key_bits, value_bits, 128, 64, torch.bfloat16)
    seq_lens, query_lens = [2048, 1, 97, 54, 1000], [1, 1, 1, 20, 3]
    batch = make_batch(fmt, seq_lens, query_lens, num_q_heads=4, num_kv_heads=1, block_size=block_size)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(kvformat.SUPPORTED_DTYPES), ids=str)
@pytest.mark.parametrize(
    "seq_lens,query_lens",
    [
        ([97, 300, 54], [97, 300, 54]),  # prefill
        ([97, 300, 54], [40, 33, 1]),  # chunked prefill / prefix hit next to a decode
        ([130, 1, 17, 64], [1, 1, 17, 2]),  # decode, a 1-token prompt, a prefill, a 2-token spec step
    ],
    ids=["prefill", "chunked", "mixed"],
)
def test_prefill_and_chunked(seq_lens, query_lens, dtype, device):
    fmt = kvformat.LayerFormat(4, 2, 128, 32, dtype)
    batch = make_batch(fmt, seq_lens, query_lens, num_q_heads=4, num_kv_heads=2, block_size=16)
    check_against_reference(batch, device)


SHAPES = [(d, g) for d in (64, 128, 256) for g in (32, 64, 128) if d % g == 0] + [(80, 80), (96, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_size,group_size", SHAPES)
def test_head_and_group_sizes(head_size, group_size, device):
    fmt = kvformat.LayerFormat(8, 4, head_size, group_size, torch.float16)
    batch = make_batch(fmt, [70, 200, 9], [1, 30, 9], num_q_heads=4, num_kv_heads=2, block_size=16)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (16, 2), (8, 1), (40, 8), (64, 1)])
def test_gqa_ratios(num_q_heads, num_kv_heads, device):
    fmt = kvformat.LayerFormat(4, 4, 64, 32, torch.bfloat16)
    batch = make_batch(fmt, [150, 33, 1], [1, 12, 1], num_q_heads, num_kv_heads, block_size=32)
    check_against_reference(batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sliding_window,softcap", [(32, None), (None, 30.0), (100, 50.0), (1, None)])
def test_sliding_window_and_softcap(sliding_window, softcap, device):
    fmt = kvformat.LayerFormat(8, 2, 128, 64, torch.float32)
    batch = make_batch(fmt, [300, 64, 1000, 5], [1, 64, 50, 2], num_q_heads=4, num_kv_heads=2, block_size=16)
    check_against_reference(batch, device, sliding_window, softcap)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_query_and_out(device):
    """query and out as [T, Hq, D] views with a token stride larger than Hq * D (fused qkv)."""
    fmt = kvformat.LayerFormat(4, 8, 64, 64, torch.bfloat16)
    batch = make_batch(fmt, [40, 90], [3, 1], num_q_heads=4, num_kv_heads=2, block_size=16)
    expected = reference_attention(batch, 0.125)
    fused = torch.randn(4, 4 + 2 * 2, 64, dtype=torch.bfloat16, device=device)
    fused[:, :4] = batch.query.to(device)
    out_storage = torch.zeros(4, 6, 64, dtype=torch.bfloat16, device=device)
    on_device = batch.to(device)
    ops.paged_attention(out_storage[:, 1:5], fused[:, :4], on_device.kv_cache, on_device.block_table,
                        on_device.seq_lens, on_device.query_start_loc, 3, 90, 0.125, fmt)
    torch.testing.assert_close(out_storage[:, 1:5].cpu().float(), expected.float(), **TOLERANCE[torch.bfloat16])
    assert out_storage[:, [0, 5]].abs().sum() == 0  # nothing written outside the view


def unquantized_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Causal attention in fp32 over the K/V as given to the writer (no quantization)."""
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
    mid-range makes max_j |v_j - c| half its range. eps = scale * max_j |q . (k^_j - k_j)| is
    measured per query row from the dequantized keys. 16-bit keys give eps = 0: the bound is
    then exactly the value quantization error.
    """
    num_q_heads, num_kv_heads = batch.query.shape[1], batch.keys[0].shape[1]
    group = num_q_heads // num_kv_heads
    bound = torch.empty(batch.query.shape)
    for seq, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
        start, end = int(batch.query_start_loc[seq]), int(batch.query_start_loc[seq + 1])
        length = key.shape[0]
        key_hat, value_hat = kvformat.read_cache_ref(batch.kv_cache, batch.block_table[seq], length, batch.fmt)
        key_error = (key_hat - key.float().transpose(0, 1)).repeat_interleave(group, 0)  # [Hq, L, D]
        value_error = (value_hat - value.float().transpose(0, 1)).abs().amax(1).repeat_interleave(group, 0)
        value_range = value.float().amax(0) - value.float().amin(0)  # [Hkv, D]
        q = batch.query[start:end].float().transpose(0, 1)  # [Hq, q_len, D]
        eps = (q @ key_error.transpose(1, 2)).abs().amax(-1) * scale  # [Hq, q_len]; over all keys: an upper bound
        spread = torch.clamp(torch.expm1(2 * eps), max=2.0)
        half_range = value_range.repeat_interleave(group, 0) / 2  # [Hq, D]
        per_row = value_error.unsqueeze(1) + spread.unsqueeze(-1) * half_range.unsqueeze(1)
        bound[start:end] = per_row.transpose(0, 1)
    return bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_bits,value_bits", ATTENTION_BIT_PAIRS)
def test_close_to_unquantized_attention(key_bits, value_bits, device):
    fmt = kvformat.LayerFormat(key_bits, value_bits, 64, 32, torch.float32)
    batch = make_batch(fmt, [200, 31, 64], [1, 31, 4], num_q_heads=4, num_kv_heads=2, block_size=16, seed=3)
    scale = 64**-0.5
    error = (run_op(batch, device) - unquantized_attention(batch, scale)).abs()
    slack = 1e-5  # fp32 arithmetic of the two computations
    assert (error <= quantization_error_bound(batch, scale) + slack).all(), f"max error {error.max():.4g}"
    if (key_bits, value_bits) == (16, 16):
        assert error.max() <= slack


def test_rejects_bad_arguments():
    fmt = kvformat.LayerFormat(4, 4, 64, 64, torch.bfloat16)
    batch = make_batch(fmt, [10], [1], num_q_heads=3, num_kv_heads=1, block_size=16)
    out = torch.empty_like(batch.query)
    args = (batch.block_table, batch.seq_lens, batch.query_start_loc, 1, 10, 0.125)
    ops.load_kernels()
    with pytest.raises(RuntimeError, match="bytes per token"):
        torch.ops.kvtuner.paged_attention(out, batch.query, batch.kv_cache, *args, 8, 4, 64, 0, 0.0)
    with pytest.raises(RuntimeError, match="must be a multiple of KV heads"):
        torch.ops.kvtuner.paged_attention(out, batch.query, batch.kv_cache[:, [0, 0]], *args, 4, 4, 64, 0, 0.0)
    with pytest.raises(RuntimeError, match="block_table must be int32"):
        torch.ops.kvtuner.paged_attention(out, batch.query, batch.kv_cache, batch.block_table.long(),
                                          *args[1:], 4, 4, 64, 0, 0.0)


def test_opcheck():
    fmt = kvformat.LayerFormat(8, 4, 64, 32, torch.bfloat16)
    batch = make_batch(fmt, [40, 7], [2, 7], num_q_heads=4, num_kv_heads=2, block_size=16)
    ops.load_kernels()
    out = torch.empty_like(batch.query)
    torch.library.opcheck(
        torch.ops.kvtuner.paged_attention.default,
        (out, batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc,
         7, 40, 0.125, 8, 4, 32, 0, 0.0),
    )
