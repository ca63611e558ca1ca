"""write_window against reference.write_window_ref: the ring caches must be identical."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICES, PagedBatch, layer_format, make_batch

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import ops
from kvtuner_vllm import reference as kvref

# (history, rows) per sequence: fewer rows than the window, exactly R, more (a long chunk whose
# earlier rows never reach the ring), wrapping around the ring, one row, none.
STEPS = [(0, 3), (10, 16), (7, 40), (29, 9), (100, 1), (4, 0), (0, 1)]


def window_batch(window: int, dtype=torch.bfloat16, num_kv_heads=2, seed=0) -> PagedBatch:
    fmt = layer_format(4, 4, 64, 32, dtype, window=window)
    return make_batch(fmt, [h + r for h, r in STEPS], [r for _, r in STEPS], num_kv_heads, num_kv_heads,
                      block_size=64, seed=seed)


def write_both(batch: PagedBatch, device: str, key=None, value=None) -> tuple[torch.Tensor, torch.Tensor]:
    key = batch.key if key is None else key
    value = batch.value if value is None else value
    expected = batch.ring_cache.clone()
    kvref.write_window_ref(key, value, expected, batch.ring_block_ids, batch.query_start_loc, batch.seq_lens,
                              batch.fmt)
    b = batch.to(device)
    actual = b.ring_cache.clone()
    ops.write_window(key.to(device), value.to(device), actual, b.ring_block_ids, b.query_start_loc, b.seq_lens,
                     batch.fmt)
    return expected, actual.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(kvformat.SUPPORTED_DTYPES), ids=str)
@pytest.mark.parametrize("window", [1, 5, 16, 64])
def test_matches_reference(window, dtype, device):
    batch = window_batch(window, dtype)
    expected, actual = write_both(batch, device)
    assert not torch.equal(expected, batch.ring_cache), "the step must change the rings"
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_qkv_views(device):
    batch = window_batch(8, num_kv_heads=3)
    tokens, heads, head_size = batch.key.shape
    qkv = torch.randn(tokens, 4 * heads * head_size).to(batch.key.dtype)
    key = qkv[:, 2 * heads * head_size : 3 * heads * head_size].view(tokens, heads, head_size)
    value = qkv[:, 3 * heads * head_size :].view(tokens, heads, head_size)
    key.copy_(batch.key)
    value.copy_(batch.value)
    expected, actual = write_both(batch, device, key, value)
    assert torch.equal(expected, actual)


def raw_call(batch: PagedBatch, **overrides):
    args = dict(key=batch.key, value=batch.value, ring_cache=batch.ring_cache.clone(),
                ring_block_ids=batch.ring_block_ids, query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
                residual_length=batch.fmt.window)
    args.update(overrides)
    ops.load_kernels()
    torch.ops.kvtuner.write_window(*args.values())


def test_rejects_bad_arguments():
    batch = window_batch(8)
    with pytest.raises(RuntimeError, match="ring_cache must be"):
        raw_call(batch, residual_length=4)
    with pytest.raises(RuntimeError, match="needs residual_length > 0"):
        raw_call(batch, residual_length=0)
    with pytest.raises(RuntimeError, match=r"ring_block_ids\[1\] = 9 lies outside the ring cache's 9 blocks"):
        raw_call(batch, ring_block_ids=torch.tensor([0, 9, 1, 2, 3, 4, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="query_start_loc ends at 70 but key has only 60 rows"):
        raw_call(batch, key=batch.key[:60], value=batch.value[:60])
    with pytest.raises(RuntimeError, match="query_len must be <= seq_len"):
        raw_call(batch, seq_lens=batch.seq_lens - 10)


def test_opcheck():
    batch = window_batch(8)
    ops.load_kernels()
    torch.library.opcheck(torch.ops.kvtuner.write_window.default,
                          (batch.key, batch.value, batch.ring_cache.clone(), batch.ring_block_ids,
                           batch.query_start_loc, batch.seq_lens, 8))
