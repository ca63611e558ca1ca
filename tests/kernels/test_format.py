"""The pure-torch reference of the packed format (kvtuner_vllm/format.py): the ground truth
the kernels are compared against, so it is checked on its own first."""

from __future__ import annotations

import pytest
import torch

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref

QUANT_BITS = (2, 4, 8)
FP16_HALF_ULP = 2.0**-11  # relative rounding error of an fp16 normal number
FP16_MIN_SUBNORMAL = 2.0**-24


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (7, 128), dtype=torch.uint8)
    packed = kvref.pack_codes(codes, bits)
    assert packed.shape == (7, 128 * bits // 8)
    assert torch.equal(kvref.unpack_codes(packed, bits), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(kvref.pack_codes(kvref.unpack_codes(every_byte, bits), bits), every_byte)


def test_pack_order_is_little_end_first():
    assert kvref.pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert kvref.pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]


def error_bound(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-element bound on |x - x_hat| for the quantizer of format.py.

    With exact scale s = (hi - lo) / qmax and zero lo, rounding to the nearest code costs at
    most s_h / 2. Rounding the zero to fp16 moves it by <= 2^-11 |lo| (+ half the smallest
    subnormal); codes of values below it clamp to 0. Rounding the scale moves it by <= 2^-11 s,
    or by half the fp16 subnormal spacing (2^-25) when s is subnormal, so the top code qmax * s_h
    lies within 2^-11 (hi - lo) + qmax 2^-25 of the range; values beyond it clamp to qmax.
    Both shifts add to the half step; fp32 arithmetic adds a few ulps of max |x|.
    """
    groups = x.float().unflatten(-1, (-1, group_size))
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale_h = ((hi - lo) / (2**bits - 1)).to(torch.float16).float()
    zero_shift = FP16_HALF_ULP * lo.abs() + FP16_MIN_SUBNORMAL
    scale_shift = FP16_HALF_ULP * (hi - lo) + (2**bits - 1) * FP16_MIN_SUBNORMAL / 2
    fp32_noise = 4 * 2.0**-24 * groups.abs().amax(-1, keepdim=True)
    return (scale_h / 2 + zero_shift + scale_shift + fp32_noise).expand_as(groups).flatten(-2)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0])
def test_error_within_half_a_step(bits, group_size, magnitude):
    generator = torch.Generator().manual_seed(bits * group_size)
    x = (torch.randn(256, 128, generator=generator) + torch.randn(256, 1, generator=generator)) * magnitude
    x_hat = kvref.fake_quantize(x, bits, group_size)
    assert ((x_hat - x).abs() <= error_bound(x, bits, group_size)).all()


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_constant_and_zero_groups_are_exact(bits):
    x = torch.zeros(3, 64)
    x[1] = 0.3125  # fp16-representable: the zero stores it exactly
    x[2, :32] = -7.5
    x_hat = kvref.fake_quantize(x, bits, 32)
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat, x)
    codes, scale, _ = kvref.quantize(x, bits, 32)
    assert (codes == 0).all() and (scale == 0).all()


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_large_magnitudes_stay_finite(bits):
    """Beyond fp16 the zero and the scale clamp to +-65504: finite, if no longer accurate."""
    x = torch.tensor([[1e30, -1e30] * 16, [6e4, -6e4] * 16, [65504.0] * 31 + [-65504.0]])
    x_hat = kvref.fake_quantize(x, bits, 32)
    assert torch.isfinite(x_hat).all()
    assert ((x_hat[1:] - x[1:]).abs() <= error_bound(x[1:], bits, 32)).all()


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("dtype", kvformat.SUPPORTED_DTYPES, ids=str)
def test_encode_decode_matches_fake_quantize(bits, dtype):
    x = torch.randn(10, 64).to(dtype)
    code, params = kvref.encode(x, bits, 32)
    assert code.shape == (10, kvformat.code_bytes(bits, 64, dtype))
    assert params.shape == (10, kvformat.param_bytes(bits, 64, 32))
    assert torch.equal(kvref.decode(code, params, bits, 32, dtype).to(dtype), kvref.fake_quantize(x, bits, 32))


def test_sixteen_bits_round_trip_is_exact():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    code, params = kvref.encode(x, 16, 64)
    assert params.numel() == 0
    assert torch.equal(kvref.decode(code, params, 16, 64, torch.bfloat16), x.float())


@pytest.mark.parametrize(
    "key_bits,value_bits,head_size,group_size,expected_bytes",
    [(4, 4, 64, 64, 72), (4, 2, 64, 64, 56), (8, 4, 64, 64, 104), (16, 16, 64, 64, 256),
     (2, 2, 128, 32, 96), (8, 16, 128, 128, 388)],
)
def test_bytes_per_token(key_bits, value_bits, head_size, group_size, expected_bytes):
    fmt = kvformat.LayerFormat(key_bits, value_bits, head_size, group_size, torch.bfloat16)
    assert fmt.bytes_per_token == expected_bytes


def test_compression_and_plane_offsets():
    fmt = kvformat.LayerFormat(4, 4, 64, 64, torch.bfloat16)
    assert fmt.compression == pytest.approx(256 / 72)
    assert round(fmt.compression, 2) == 3.56
    # planar per (block, head): 16 x 32 B key codes, 16 x 4 B key params, 16 x 32 B value codes, params
    assert fmt.plane_offsets(16) == (0, 512, 576, 1088)
    assert fmt.plane_offsets(16)[3] + 16 * fmt.value_param_bytes == 16 * fmt.bytes_per_token


def test_sixteen_bit_page_is_a_stock_bf16_page():
    """A 16/16 layer is byte-identical to vLLM's CPU page [B, H, N, 2D]: K plane, then V plane."""
    fmt = kvformat.LayerFormat(16, 16, 64, 64, torch.bfloat16)
    key = torch.randn(16, 2, 64, dtype=torch.bfloat16)
    value = torch.randn(16, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(fmt.cache_shape(1, 2, 16), dtype=torch.uint8)
    kvref.quantize_and_cache_ref(key, value, cache, torch.arange(16), fmt)
    planes = cache.view(torch.bfloat16).view(1, 2, 2, 16, 64)  # [B, H, K|V, N, D]
    assert torch.equal(planes[0, :, 0], key.transpose(0, 1))
    assert torch.equal(planes[0, :, 1], value.transpose(0, 1))


@pytest.mark.parametrize(
    "head_size,group_size,message",
    [(64, 48, "unsupported group size"), (96, 64, "does not divide"), (72, 32, "multiple of 16")],
)
def test_invalid_formats_are_rejected(head_size, group_size, message):
    with pytest.raises(ValueError, match=message):
        kvformat.LayerFormat(4, 4, head_size, group_size)
    with pytest.raises(ValueError, match="unsupported bit width"):
        kvformat.LayerFormat(3, 4, 64, 64)


@pytest.mark.parametrize(
    "position,block_size,window,expected",
    [(0, 16, 0, 1), (37, 16, 0, 38), (37, 16, 4, 34), (33, 16, 4, 32), (32, 16, 4, 32), (37, 16, 16, 32),
     (47, 16, 16, 32), (47, 64, 16, 32), (100, 128, 128, 0)],
)
def test_window_start(position, block_size, window, expected):
    """w0(p) = max(block start, p - R + 1): the window never leaves p's block; R = 0 reads nothing in it."""
    assert int(kvref.window_start(torch.tensor(position), block_size, window)) == expected


def test_kivi_key_params_per_token_group():
    """Kivi keys store D (scale, zero) pairs per G_t tokens: 4 D / G_t bytes per token."""
    fmt = kvformat.LayerFormat(4, 2, 64, 32, scheme=kvformat.KIVI, key_group_size=16, residual_length=16)
    assert (fmt.key_code_bytes, fmt.key_param_bytes, fmt.value_code_bytes, fmt.value_param_bytes) == (32, 16, 16, 8)
    assert fmt.window_bytes == 16 * 2 * 64 * 2
    assert fmt.ring_shape(5, 3) == (5, 3, 16, 128)
    unquantized = kvformat.LayerFormat(16, 16, 64, 64, residual_length=16)
    assert unquantized.window == 0 and unquantized.window_bytes == 0  # nothing differs in a window


@pytest.mark.parametrize(
    "scheme,key_group_size,residual_length,message",
    [("kivi", 0, 16, "needs key_group_size"), ("kivi", 32, 16, "residual_length >= key_group_size"),
     ("per-token-group", 16, 16, "kivi scheme only"), ("per-token-group", 0, 300, "must lie in"),
     ("other", 0, 0, "unknown scheme")],
)
def test_invalid_windows_are_rejected(scheme, key_group_size, residual_length, message):
    with pytest.raises(ValueError, match=message):
        kvformat.LayerFormat(4, 4, 64, 64, scheme=scheme, key_group_size=key_group_size,
                             residual_length=residual_length)


def test_block_size_rules():
    fmt = kvformat.LayerFormat(4, 4, 64, 64, scheme=kvformat.KIVI, key_group_size=32, residual_length=48)
    kvformat.check_block_size(fmt, 96)
    with pytest.raises(ValueError, match="exceeds the block size"):
        kvformat.check_block_size(fmt, 32)
    with pytest.raises(ValueError, match="does not divide the block size"):
        kvformat.check_block_size(fmt, 80)


@pytest.mark.parametrize("window,key_group_size", [(0, 0), (6, 0), (16, 16)])
def test_reference_steps_match_simulated_attention(window, key_group_size):
    """The reference ops run step by step (write, attend, write the ring) compute simulated_attention."""
    scheme = kvformat.KIVI if key_group_size else kvformat.PER_TOKEN
    fmt = kvformat.LayerFormat(4, 2, 64, 32, torch.float32, scheme=scheme, key_group_size=key_group_size,
                               residual_length=window)
    block_size, length, chunks = 16, 70, [5, 20, 1, 1, 30, 13]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(length, 4, 64, generator=generator)
    key = torch.randn(length, 2, 64, generator=generator) + 3 * torch.randn(2, 64, generator=generator)
    value = torch.randn(length, 2, 64, generator=generator)
    cache = torch.zeros(fmt.cache_shape(5, 2, block_size), dtype=torch.uint8)
    ring = torch.zeros(fmt.ring_shape(1, 2)) if fmt.has_window else None
    ring_ids = torch.zeros(1, dtype=torch.int32) if fmt.has_window else None
    block_table = torch.tensor([[4, 2, 0, 1, 3]], dtype=torch.int32)
    out, done = [], 0
    for rows in chunks:
        step = slice(done, done + rows)
        positions = torch.arange(done, done + rows)
        slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
        seqs = {"query_start_loc": torch.tensor([0, rows], dtype=torch.int32),
                "seq_lens": torch.tensor([done + rows], dtype=torch.int32)}
        kvref.quantize_and_cache_ref(key[step], value[step], cache, slots, fmt, ring_cache=ring,
                                        ring_block_ids=ring_ids, **seqs)
        out.append(kvref.paged_attention_ref(query[step], key[step], value[step], cache, block_table,
                                                scale=0.125, fmt=fmt, ring_cache=ring, ring_block_ids=ring_ids, **seqs))
        if ring is not None:
            kvref.write_window_ref(key[step], value[step], ring, ring_ids, fmt=fmt, **seqs)
        done += rows
    expected = kvref.simulated_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                            value.transpose(0, 1)[None], fmt, block_size, 0.125)[0].transpose(0, 1)
    torch.testing.assert_close(torch.cat(out), expected, atol=2e-5, rtol=2e-5)


def test_format_py_agrees_with_the_kernels_constants():
    """csrc/packed_format.h is the kernels' one source of these numbers; format.py states them for
    Python: the two must say the same."""
    kernels = ops.format_constants()
    assert kernels["supported_bits"] == kvformat.SUPPORTED_BITS
    assert kernels["unquantized_bits"] == (kvformat.UNQUANTIZED_BITS,)
    assert kernels["supported_group_sizes"] == kvformat.SUPPORTED_GROUP_SIZES
    assert kernels["supported_key_group_sizes"] == kvformat.SUPPORTED_KEY_GROUP_SIZES
    assert kernels["supported_head_sizes"] == kvformat.SUPPORTED_HEAD_SIZES
    assert kernels["head_size_multiple"] == (kvformat.HEAD_SIZE_MULTIPLE,)
    assert kernels["max_head_size"] == (max(kvformat.SUPPORTED_HEAD_SIZES),)
    assert kernels["max_residual_length"] == (kvformat.MAX_RESIDUAL_LENGTH,)
    assert kernels["param_bytes_per_group"] == (kvformat.PARAM_BYTES_PER_GROUP,)
    assert kernels["fp16_max"] == (int(kvformat.FP16_MAX),)
    assert {name for name in kernels if name.startswith("cuda_")} == {
        "cuda_decode_rows", "cuda_decode_max_query", "cuda_split_target_blocks", "cuda_max_partitions"}
