"""quantize_and_cache against reference.quantize_and_cache_ref: the cache bytes must be identical."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import DEVICES, PagedBatch, layer_format, make_batch

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref

BITS = kvformat.SUPPORTED_BITS
DTYPES = list(kvformat.SUPPORTED_DTYPES)

# (history, rows) per sequence: steps that start and end inside kivi key groups and blocks, a
# step that completes no group, a 1-token prompt and an idle sequence.
STEPS = [(37, 1), (0, 20), (50, 13), (31, 1), (32, 1), (0, 1), (63, 2), (100, 70), (5, 0)]
# Format variants: (window, kivi key group size).
SCHEMES = {"per-token": (0, 0), "per-token-window": (8, 0), "kivi": (16, 16), "kivi-wide-window": (24, 16)}


def step_batch(fmt, num_kv_heads=2, block_size=32, steps=STEPS, seed=0) -> PagedBatch:
    seq_lens = [history + rows for history, rows in steps]
    return make_batch(fmt, seq_lens, [rows for _, rows in steps], num_kv_heads, num_kv_heads, block_size, seed)


def write_with_op(batch: PagedBatch, device: str, key=None, value=None, slot_mapping=None) -> torch.Tensor:
    """The cache after the op wrote the step into the cache the earlier steps left."""
    b = batch.to(device)
    cache = b.cache_before.clone()
    ops.quantize_and_cache(b.key if key is None else key.to(device), b.value if value is None else value.to(device),
                           cache, b.slot_mapping if slot_mapping is None else slot_mapping.to(device), b.fmt,
                           b.query_start_loc, b.seq_lens, b.ring_cache, b.ring_block_ids)
    return cache.cpu()


def write_with_reference(batch: PagedBatch, key, value, slot_mapping) -> torch.Tensor:
    cache = batch.cache_before.clone()
    kvref.quantize_and_cache_ref(key, value, cache, slot_mapping, batch.fmt, batch.query_start_loc, batch.seq_lens,
                                    batch.ring_cache, batch.ring_block_ids)
    return cache


def assert_same_bytes(expected: torch.Tensor, actual: torch.Tensor) -> None:
    mismatched = (expected != actual).nonzero()
    first = mismatched[:4].tolist()
    assert mismatched.numel() == 0, f"{len(mismatched)} bytes differ, first at [block, head, slot, byte] {first}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key_bits,value_bits", list(itertools.product(BITS, BITS)))
def test_every_bit_pair(key_bits, value_bits, dtype, scheme, device):
    window, key_group_size = SCHEMES[scheme]
    fmt = layer_format(key_bits, value_bits, 64, 32, dtype, window=window, key_group_size=key_group_size)
    batch = step_batch(fmt)
    assert_same_bytes(batch.kv_cache, write_with_op(batch, device))


SHAPES = [(d, g) for d in (64, 128, 256) for g in (32, 64, 128) if d % g == 0] + [(80, 80), (96, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size,group_size", SHAPES)
def test_head_group_block_sizes(head_size, group_size, block_size, device):
    for key_bits, value_bits, key_group_size in [(4, 2, 0), (8, 4, 16), (2, 16, 16), (4, 8, 0)]:
        fmt = layer_format(key_bits, value_bits, head_size, group_size, torch.bfloat16, window=16,
                           key_group_size=key_group_size)
        batch = step_batch(fmt, num_kv_heads=3, block_size=block_size)
        assert_same_bytes(batch.kv_cache, write_with_op(batch, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_qkv_views_and_padding(dtype, scheme, device):
    """key and value as views into a [T, (Hq + 2 Hkv) * D] projection (token stride > H * D), and
    padding slots (< 0) among the rows, one of them completing a kivi key group."""
    window, key_group_size = SCHEMES[scheme]
    fmt = layer_format(4, 8, 64, 32, dtype, window=window, key_group_size=key_group_size)
    batch = step_batch(fmt, num_kv_heads=4)
    tokens, heads, head_size = batch.key.shape
    qkv = torch.randn(tokens, (2 * heads + 2 * heads) * head_size).to(dtype)
    key = qkv[:, 2 * heads * head_size : 3 * heads * head_size].view(tokens, heads, head_size)
    value = qkv[:, 3 * heads * head_size :].view(tokens, heads, head_size)
    key.copy_(batch.key)
    value.copy_(batch.value)
    slot_mapping = batch.slot_mapping.clone()
    slot_mapping[[3, 4, 28, 34]] = -1  # 34: position 31 of the (31, 1) step, completing the kivi group 16..31
    expected = write_with_reference(batch, key, value, slot_mapping)
    assert_same_bytes(expected, write_with_op(batch, device, key, value, slot_mapping))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("magnitude", [1e-6, 1e3, 7e4, 1e30])
def test_extreme_magnitudes(magnitude, scheme, device):
    """Tiny values (fp16-subnormal scales), large ones and ones beyond fp16 (clamped zero and scale)."""
    window, key_group_size = SCHEMES[scheme]
    fmt = layer_format(2, 4, 64, 32, torch.float32, window=window, key_group_size=key_group_size)
    batch = step_batch(fmt)
    key, value = batch.key * magnitude, batch.value * magnitude
    if batch.ring_cache is not None:
        batch.ring_cache.mul_(magnitude)
    expected = write_with_reference(batch, key, value, batch.slot_mapping)
    assert_same_bytes(expected, write_with_op(batch, device, key, value))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_constant_groups(scheme, device):
    window, key_group_size = SCHEMES[scheme]
    fmt = layer_format(4, 2, 64, 32, torch.bfloat16, window=window, key_group_size=key_group_size)
    batch = step_batch(fmt)
    key, value = torch.full_like(batch.key, 0.3), torch.zeros_like(batch.value)
    if batch.ring_cache is not None:
        batch.ring_cache.fill_(0.3)
    expected = write_with_reference(batch, key, value, batch.slot_mapping)
    assert_same_bytes(expected, write_with_op(batch, device, key, value))


def test_slot_mapping_shorter_than_tokens():
    """vLLM pads the token dimension; only the first len(slot_mapping) tokens are written."""
    fmt = layer_format(8, 4, 64, 64, torch.bfloat16)
    key = torch.randn(12, 2, 64, dtype=torch.bfloat16)
    value = torch.randn(12, 2, 64, dtype=torch.bfloat16)
    slots = torch.tensor([5, 1, 9])
    expected = torch.zeros(fmt.cache_shape(1, 2, 16), dtype=torch.uint8)
    actual = expected.clone()
    kvref.quantize_and_cache_ref(key[:3], value[:3], expected, slots, fmt)
    ops.quantize_and_cache(key, value, actual, slots, fmt)
    assert_same_bytes(expected, actual)


def raw_call(batch: PagedBatch, **overrides):
    """torch.ops.kvtuner.quantize_and_cache with the batch's arguments, some replaced."""
    fmt = batch.fmt
    args = dict(key=batch.key, value=batch.value, kv_cache=batch.cache_before.clone(), slot_mapping=batch.slot_mapping,
                ring_cache=batch.ring_cache, ring_block_ids=batch.ring_block_ids,
                query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, key_bits=fmt.key_bits,
                value_bits=fmt.value_bits, group_size=fmt.group_size, key_group_size=fmt.kernel_key_group_size,
                residual_length=fmt.window)
    args.update(overrides)
    ops.load_kernels()
    torch.ops.kvtuner.quantize_and_cache(*args.values())


def test_rejects_bad_arguments():
    batch = step_batch(layer_format(4, 4, 64, 64, torch.bfloat16))
    with pytest.raises(RuntimeError, match="bytes per token"):
        raw_call(batch, key_bits=8)
    with pytest.raises(RuntimeError, match="key_bits must be 2, 4, 8 or 16"):
        raw_call(batch, key_bits=3)
    with pytest.raises(RuntimeError, match="group_size 48"):
        raw_call(batch, group_size=48)
    with pytest.raises(RuntimeError, match="slot_mapping must be a contiguous int64"):
        raw_call(batch, slot_mapping=batch.slot_mapping.int())
    with pytest.raises(RuntimeError, match="must be bfloat16, float16 or float32"):
        raw_call(batch, key=batch.key.double(), value=batch.value.double())


def test_rejects_out_of_bounds_indices():
    kivi = step_batch(layer_format(4, 4, 64, 64, torch.bfloat16, window=16, key_group_size=16))
    capacity = kivi.cache_before.shape[0] * kivi.cache_before.shape[2]
    bad_slots = kivi.slot_mapping.clone()
    bad_slots[7] = capacity
    with pytest.raises(RuntimeError, match=rf"slot_mapping\[7\] = {capacity} lies outside the cache's {capacity}"):
        raw_call(kivi, slot_mapping=bad_slots)
    with pytest.raises(RuntimeError, match="query_start_loc ends at 109 but slot_mapping has only 100 rows"):
        raw_call(kivi, slot_mapping=kivi.slot_mapping[:100])
    with pytest.raises(RuntimeError, match="query_len must be <= seq_len"):
        raw_call(kivi, seq_lens=kivi.seq_lens - 2)
    with pytest.raises(RuntimeError, match=r"ring_block_ids\[2\] = 99 lies outside the ring cache's"):
        raw_call(kivi, ring_block_ids=torch.tensor([0, 1, 99, 2, 3, 4, 5, 6, 7], dtype=torch.int32))


def test_opcheck():
    batch = step_batch(layer_format(4, 2, 64, 32, torch.bfloat16, window=16, key_group_size=16))
    ops.load_kernels()
    torch.library.opcheck(torch.ops.kvtuner.quantize_and_cache.default,
                          (batch.key, batch.value, batch.cache_before.clone(), batch.slot_mapping, batch.ring_cache,
                           batch.ring_block_ids, batch.query_start_loc, batch.seq_lens, 4, 2, 32, 16, 16))
