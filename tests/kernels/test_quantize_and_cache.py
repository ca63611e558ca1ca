"""quantize_and_cache against format.quantize_and_cache_ref: the cache bytes must be identical."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import DEVICES

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops

BITS = kvformat.SUPPORTED_BITS
DTYPES = list(kvformat.SUPPORTED_DTYPES)


def write_both(fmt, num_tokens, num_heads, block_size, device, *, num_blocks=6, fused_qkv=False, padding=(),
               magnitude=3.0, seed=0):
    """Write one batch with the reference and with the op into equal random caches; return both."""
    generator = torch.Generator().manual_seed(seed)
    head_size = fmt.head_size
    if fused_qkv:
        # key and value are views into a [T, (Hq + 2 Hkv) * D] projection: token stride > H * D.
        num_q_heads = 2 * num_heads
        qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_heads) * head_size, generator=generator)
        qkv = (qkv * magnitude).to(fmt.dtype)
        q_width, kv_width = num_q_heads * head_size, num_heads * head_size
        key = qkv[:, q_width : q_width + kv_width].view(num_tokens, num_heads, head_size)
        value = qkv[:, q_width + kv_width :].view(num_tokens, num_heads, head_size)
    else:
        key = (torch.randn(num_tokens, num_heads, head_size, generator=generator) * magnitude).to(fmt.dtype)
        value = (torch.randn(num_tokens, num_heads, head_size, generator=generator) * magnitude).to(fmt.dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    for index in padding:
        slots[index] = -1
    cache = torch.randint(0, 256, fmt.cache_shape(num_blocks, num_heads, block_size), dtype=torch.uint8,
                          generator=generator)
    expected = cache.clone()
    kvformat.quantize_and_cache_ref(key, value, expected, slots, fmt)
    actual = cache.to(device)
    ops.quantize_and_cache(key.to(device), value.to(device), actual, slots.to(device), fmt)
    return expected, actual.cpu()


def assert_same_bytes(expected: torch.Tensor, actual: torch.Tensor) -> None:
    mismatched = (expected != actual).nonzero()
    first = mismatched[:4].tolist()
    assert mismatched.numel() == 0, f"{len(mismatched)} bytes differ, first at [block, head, slot, byte] {first}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key_bits,value_bits", list(itertools.product(BITS, BITS)))
def test_every_bit_pair(key_bits, value_bits, dtype, device):
    fmt = kvformat.LayerFormat(key_bits, value_bits, head_size=128, group_size=64, dtype=dtype)
    assert_same_bytes(*write_both(fmt, num_tokens=37, num_heads=2, block_size=16, device=device, padding=(0, 5)))


SHAPES = [(d, g) for d in (64, 128, 256) for g in (32, 64, 128) if d % g == 0] + [(80, 80), (96, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size,group_size", SHAPES)
def test_head_group_block_sizes(head_size, group_size, block_size, device):
    for key_bits, value_bits in [(4, 2), (8, 4), (2, 16)]:
        fmt = kvformat.LayerFormat(key_bits, value_bits, head_size, group_size, torch.bfloat16)
        expected, actual = write_both(fmt, num_tokens=40, num_heads=3, block_size=block_size, device=device,
                                      num_blocks=max(1, 200 // block_size) + 1)
        assert_same_bytes(expected, actual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_qkv_views_and_padding(dtype, device):
    fmt = kvformat.LayerFormat(4, 8, 64, 32, dtype)
    assert_same_bytes(*write_both(fmt, num_tokens=29, num_heads=4, block_size=16, device=device, fused_qkv=True,
                                  padding=(3, 4, 28)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("magnitude", [1e-6, 1e3, 7e4, 1e30])
def test_extreme_magnitudes(magnitude, device):
    """Tiny values (fp16-subnormal scales), large ones and ones beyond fp16 (clamped zero and scale)."""
    fmt = kvformat.LayerFormat(2, 4, 64, 32, torch.float32)
    assert_same_bytes(*write_both(fmt, num_tokens=20, num_heads=2, block_size=16, device=device,
                                  magnitude=magnitude))


@pytest.mark.parametrize("device", DEVICES)
def test_constant_groups(device):
    fmt = kvformat.LayerFormat(4, 2, 64, 32, torch.bfloat16)
    key = torch.full((5, 1, 64), 0.3, dtype=torch.bfloat16)
    value = torch.zeros(5, 1, 64, dtype=torch.bfloat16)
    slots = torch.tensor([0, 3, 7, -1, 12])
    expected = torch.zeros(fmt.cache_shape(2, 1, 16), dtype=torch.uint8)
    actual = expected.clone().to(device)
    kvformat.quantize_and_cache_ref(key, value, expected, slots, fmt)
    ops.quantize_and_cache(key.to(device), value.to(device), actual, slots.to(device), fmt)
    assert_same_bytes(expected, actual.cpu())


def test_slot_mapping_shorter_than_tokens():
    """vLLM pads the token dimension; only the first len(slot_mapping) tokens are written."""
    fmt = kvformat.LayerFormat(8, 4, 64, 64, torch.bfloat16)
    key = torch.randn(12, 2, 64, dtype=torch.bfloat16)
    value = torch.randn(12, 2, 64, dtype=torch.bfloat16)
    slots = torch.tensor([5, 1, 9])
    expected = torch.zeros(fmt.cache_shape(1, 2, 16), dtype=torch.uint8)
    actual = expected.clone()
    kvformat.quantize_and_cache_ref(key[:3], value[:3], expected, slots, fmt)
    ops.quantize_and_cache(key, value, actual, slots, fmt)
    assert_same_bytes(expected, actual)


def test_rejects_bad_arguments():
    fmt = kvformat.LayerFormat(4, 4, 64, 64, torch.bfloat16)
    key = torch.randn(4, 2, 64, dtype=torch.bfloat16)
    slots = torch.arange(4)
    cache = torch.zeros(fmt.cache_shape(1, 2, 16), dtype=torch.uint8)
    ops.load_kernels()
    with pytest.raises(RuntimeError, match="bytes per token"):
        torch.ops.kvtuner.quantize_and_cache(key, key, cache, slots, 8, 4, 64)
    with pytest.raises(RuntimeError, match="key_bits must be 2, 4, 8 or 16"):
        torch.ops.kvtuner.quantize_and_cache(key, key, cache, slots, 3, 4, 64)
    with pytest.raises(RuntimeError, match="group_size 48"):
        torch.ops.kvtuner.quantize_and_cache(key, key, cache, slots, 4, 4, 48)
    with pytest.raises(RuntimeError, match="slot_mapping must be a contiguous int64"):
        torch.ops.kvtuner.quantize_and_cache(key, key, cache, slots.int(), 4, 4, 64)
    with pytest.raises(RuntimeError, match="must be bfloat16, float16 or float32"):
        torch.ops.kvtuner.quantize_and_cache(key.double(), key.double(), cache, slots, 4, 4, 64)


def test_opcheck():
    fmt = kvformat.LayerFormat(4, 2, 64, 32, torch.bfloat16)
    ops.load_kernels()
    key = torch.randn(6, 2, 64, dtype=torch.bfloat16)
    value = torch.randn(6, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(fmt.cache_shape(2, 2, 16), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.kvtuner.quantize_and_cache.default,
                          (key, value, cache, torch.tensor([0, 4, -1, 17, 30, 2]), 4, 2, 32))
