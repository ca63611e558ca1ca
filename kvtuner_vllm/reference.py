"""Pure-torch references of the packed KV cache format that `kvtuner_vllm.format` specifies.

format.py describes (byte layout, constants, checks, sizes); this module computes: the
quantizer, code packing, the paged cache write, the ring write and the attention rule. The
C++ and CUDA kernels are tested against these functions byte for byte (cache writes) or
within float32 summation bounds (attention), and calibration runs `simulated_attention`.
Pure torch, no vLLM import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtuner_vllm.format import (
    FP16_MAX,
    PARAM_BYTES_PER_GROUP,
    UNQUANTIZED_BITS,
    LayerFormat,
    check_bits,
    check_block_size,
)

# ---------------------------------------------------------------------------------
# Reference quantizer
# ---------------------------------------------------------------------------------


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x[..., D] -> (codes uint8[..., D], scale fp16[..., D/G], zero fp16[..., D/G]), groups along the last dim."""
    check_bits(bits)
    if bits == UNQUANTIZED_BITS:
        raise ValueError("16-bit values are stored unquantized; there is nothing to quantize")
    qmax = float(2**bits - 1)
    groups = x.float().unflatten(-1, (-1, group_size))
    lo = groups.amin(dim=-1)
    hi = groups.amax(dim=-1)
    zero = lo.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    # A tensor divisor keeps the division correctly rounded on CUDA too (a scalar one becomes
    # a multiply by 1/qmax there), so every device computes the kernels' scale.
    scale = ((hi - lo) / torch.full_like(hi, qmax)).clamp(max=FP16_MAX).to(torch.float16)
    scale_f = scale.float()
    inv = torch.where(scale_f > 0, 1.0 / scale_f, torch.zeros_like(scale_f))
    q = torch.round((groups - zero.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, qmax)
    return q.to(torch.uint8).flatten(-2), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `quantize`, in float32."""
    groups = codes.float().unflatten(-1, (-1, group_size))
    return (groups * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-token groups: what the server stores and reads back, in x's dtype; identity for 16 bits."""
    if bits == UNQUANTIZED_BITS:
        return x
    return dequantize(*quantize(x, bits, group_size), group_size).to(x.dtype)


def quantize_channels(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One kivi key group x[..., G_t, D] -> (codes uint8[..., G_t, D], scale fp16[..., D], zero fp16[..., D]):
    each channel quantized over the group's token positions."""
    codes, scale, zero = quantize(x.transpose(-1, -2), bits, x.shape[-2])
    return codes.transpose(-1, -2), scale.squeeze(-1), zero.squeeze(-1)


def fake_quantize_kivi_keys(key: torch.Tensor, bits: int, key_group_size: int) -> torch.Tensor:
    """key[..., T, D] with each complete group of G_t positions quantized per channel, in key's dtype.
    A trailing incomplete group stays as it is: the window rule never reads it packed."""
    if bits == UNQUANTIZED_BITS:
        return key
    complete = key.shape[-2] // key_group_size * key_group_size
    out = key.clone()
    groups = key[..., :complete, :].unflatten(-2, (-1, key_group_size))  # [..., T/G_t, G_t, D]
    codes, scale, zero = quantize_channels(groups, bits)
    x_hat = codes.float() * scale.float().unsqueeze(-2) + zero.float().unsqueeze(-2)
    out[..., :complete, :] = x_hat.flatten(-3, -2).to(key.dtype)
    return out


def fake_quantize_keys(key: torch.Tensor, fmt: LayerFormat) -> torch.Tensor:
    """key[..., T, D] of whole sequences as the packed pages hold it (positions along dim -2)."""
    if fmt.kivi_keys:
        return fake_quantize_kivi_keys(key, fmt.key_bits, fmt.key_group_size)
    return fake_quantize(key, fmt.key_bits, fmt.group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes[..., D] (< 2^bits) -> packed uint8[..., D*bits/8], little end first."""
    per_byte = 8 // bits
    lanes = codes.to(torch.int32).unflatten(-1, (-1, per_byte))
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (lanes << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: packed uint8[..., P] -> codes uint8[..., P*8/bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    lanes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return lanes.flatten(-2).to(torch.uint8)


def _param_bytes(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(scale, zero) fp16[..., n] -> interleaved param bytes uint8[..., 4n]."""
    return torch.stack([scale, zero], dim=-1).flatten(-2).contiguous().view(torch.uint8)


def _scale_zero(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = params.contiguous().view(torch.float16).unflatten(-1, (-1, 2))
    return pairs[..., 0], pairs[..., 1]


def encode(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token groups: x[T, D] -> (code bytes uint8[T, code_bytes], param bytes uint8[T, param_bytes])."""
    if bits == UNQUANTIZED_BITS:
        return x.contiguous().view(torch.uint8), x.new_empty((x.shape[0], 0), dtype=torch.uint8)
    codes, scale, zero = quantize(x, bits, group_size)
    return pack_codes(codes, bits), _param_bytes(scale, zero)


def decode(code: torch.Tensor, params: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode`, in float32: (uint8[T, code_bytes], uint8[T, param_bytes]) -> [T, D]."""
    if bits == UNQUANTIZED_BITS:
        return code.contiguous().view(dtype).float()
    return dequantize(unpack_codes(code, bits), *_scale_zero(params), group_size)


# ---------------------------------------------------------------------------------
# Reference paged cache write
# ---------------------------------------------------------------------------------


@dataclass
class _PlaneViews:
    """Views of a layer cache uint8[B, H, N, C]; K params are [B, H, N/G_t, 4D] for kivi keys."""

    key_code: torch.Tensor
    key_param: torch.Tensor
    value_code: torch.Tensor
    value_param: torch.Tensor


def _plane_views(kv_cache: torch.Tensor, fmt: LayerFormat) -> _PlaneViews:
    num_blocks, num_heads, block_size, width = kv_cache.shape
    if width != fmt.bytes_per_token:
        raise ValueError(f"cache holds {width} bytes per token, format needs {fmt.bytes_per_token}")
    check_block_size(fmt, block_size)
    planes = kv_cache.flatten(2)  # [B, H, N*C], contiguous per (block, head) plane
    key_param_rows = (block_size // fmt.key_group_size, PARAM_BYTES_PER_GROUP * fmt.head_size) if fmt.kivi_keys \
        else (block_size, fmt.key_param_bytes)
    shapes = ((block_size, fmt.key_code_bytes), key_param_rows, (block_size, fmt.value_code_bytes),
              (block_size, fmt.value_param_bytes))
    views = [planes[:, :, offset : offset + rows * size].unflatten(-1, (rows, size))
             for offset, (rows, size) in zip(fmt.plane_offsets(block_size), shapes)]
    return _PlaneViews(*views)


def _ring_views(ring_cache: torch.Tensor, fmt: LayerFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views [B, H, R, D] in the model dtype of a ring cache [B, H, R, 2D] (any dtype of the same bytes)."""
    ring = ring_cache.view(fmt.dtype) if ring_cache.dtype != fmt.dtype else ring_cache
    if ring.shape[2:] != (fmt.window, 2 * fmt.head_size):
        raise ValueError(f"ring holds [.., {list(ring.shape[2:])}] per block and head, format needs "
                         f"[.., {[fmt.window, 2 * fmt.head_size]}]")
    planes = ring.flatten(2).unflatten(-1, (2, fmt.window, fmt.head_size))  # K rows then V rows
    return planes[:, :, 0], planes[:, :, 1]


def _sequence_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor):
    """Per sequence: (index, first row, row count, position of the first row)."""
    for seq in range(seq_lens.numel()):
        start, end = int(query_start_loc[seq]), int(query_start_loc[seq + 1])
        yield seq, start, end - start, int(seq_lens[seq]) - (end - start)


def quantize_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: LayerFormat,
    query_start_loc: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    ring_cache: torch.Tensor | None = None,
    ring_block_ids: torch.Tensor | None = None,
) -> None:
    """Write a step's key/value [T, H, D] into kv_cache uint8[B, H, N, C]; runs before attention.

    slot_mapping[T] gives each row's packed slot (< 0: padding, skipped). Values, and keys
    of the per-token scheme, are written per row. Kivi keys are written per token group,
    when a row completes one: its G_t positions come from this step's rows or, for earlier
    positions, from the ring (ring_block_ids[seq], which `write_window_ref` filled in earlier
    steps). The sequence arguments (query_start_loc, seq_lens) are needed for kivi keys only.
    """
    views = _plane_views(kv_cache, fmt)
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    sides = [(value[valid], fmt.value_bits, fmt.group_size, views.value_code, views.value_param)]
    if not fmt.kivi_keys:
        sides.append((key[valid], fmt.key_bits, fmt.group_size, views.key_code, views.key_param))
    for x, bits, group_size, code_view, param_view in sides:
        tokens, heads, head_size = x.shape
        code, params = encode(x.reshape(tokens * heads, head_size), bits, group_size)
        code_view[blocks, :, offsets] = code.view(tokens, heads, -1)
        param_view[blocks, :, offsets] = params.view(tokens, heads, -1)
    if not fmt.kivi_keys:
        return
    if query_start_loc is None or seq_lens is None or ring_cache is None or ring_block_ids is None:
        raise ValueError("kivi keys need query_start_loc, seq_lens, a ring cache and ring block ids")
    ring_k, _ = _ring_views(ring_cache, fmt)
    for seq, start, rows, first in _sequence_rows(query_start_loc, seq_lens):
        _write_kivi_groups(key, views, slot_mapping, fmt, block_size, start, rows, first, ring_k, ring_block_ids[seq])


def write_window_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    ring_cache: torch.Tensor,
    ring_block_ids: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: LayerFormat,
) -> None:
    """After a step's attention: the last min(R, rows) positions of each sequence go to its ring
    block at row position mod R (earlier rows of a long chunk are never read from the ring)."""
    ring_k, ring_v = _ring_views(ring_cache, fmt)
    for seq, start, rows, first in _sequence_rows(query_start_loc, seq_lens):
        kept = min(rows, fmt.window)
        ring_rows = torch.arange(first + rows - kept, first + rows) % fmt.window
        block = int(ring_block_ids[seq])
        ring_k[block, :, ring_rows] = key[start + rows - kept : start + rows].transpose(0, 1).to(ring_k.dtype)
        ring_v[block, :, ring_rows] = value[start + rows - kept : start + rows].transpose(0, 1).to(ring_v.dtype)


def _write_kivi_groups(key, views: _PlaneViews, slot_mapping, fmt: LayerFormat, block_size: int, start: int,
                       rows: int, first: int, ring_k, ring_block) -> None:
    """Quantize and store every key group of one sequence that this step's rows complete."""
    g = fmt.key_group_size
    for end in range((first // g + 1) * g, first + rows + 1, g):  # end: one past a group's last position
        row = start + end - 1 - first
        slot = int(slot_mapping[row])
        if slot < 0:
            continue
        positions = torch.arange(end - g, end)
        fresh = positions >= first
        x = torch.empty(g, key.shape[1], key.shape[2], dtype=key.dtype, device=key.device)
        x[fresh] = key[start + positions[fresh] - first]
        if (~fresh).any():
            x[~fresh] = ring_k[int(ring_block), :, positions[~fresh] % fmt.window].transpose(0, 1).to(key.dtype)
        codes, scale, zero = quantize_channels(x.transpose(0, 1), fmt.key_bits)  # [H, G_t, D], [H, D]
        block, offset = slot // block_size, slot % block_size
        views.key_code[block, :, offset - g + 1 : offset + 1] = pack_codes(codes, fmt.key_bits)
        views.key_param[block, :, offset // g] = _param_bytes(scale, zero)


# ---------------------------------------------------------------------------------
# Reference attention: paged (what the kernels compute) and simulated (what calibration runs)
# ---------------------------------------------------------------------------------


def window_start(positions: torch.Tensor, block_size: int, residual_length: int) -> torch.Tensor:
    """w0(p): the first position that the query at p reads in full precision (p + 1 without a window)."""
    if residual_length == 0:
        return positions + 1
    return torch.maximum(positions // block_size * block_size, positions - residual_length + 1)


def mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_hat: torch.Tensor,
    value_hat: torch.Tensor,
    query_positions: torch.Tensor,
    block_size: int,
    residual_length: int,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """The attention rule of this format, in float32.

    query [Hq, q, D] at `query_positions` [q]; key/value (full precision) and key_hat/value_hat
    (as the packed pages hold them) [Hkv, L, D] for positions 0..L-1. Returns [Hq, q, D].
    Positions a query does not read may hold anything finite.
    """
    groups = query.shape[0] // key.shape[0]
    key, value, key_hat, value_hat = (t.float().repeat_interleave(groups, dim=0)
                                      for t in (key, value, key_hat, value_hat))
    q = query.float()
    keys = torch.arange(key.shape[1], device=query.device).unsqueeze(0)
    positions = query_positions.unsqueeze(-1)
    full = keys >= window_start(positions, block_size, residual_length)  # [q, L]
    scores = torch.where(full, q @ key.transpose(1, 2), q @ key_hat.transpose(1, 2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(keys > positions, -math.inf).softmax(dim=-1)
    return (probs * full) @ value + (probs * ~full) @ value_hat


def simulated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    fmt: LayerFormat,
    block_size: int,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Served attention of whole sequences from position 0: query [B, Hq, T, D], key/value
    [B, Hkv, T, D] (as they enter the cache) -> [B, Hq, T, D] float32."""
    check_block_size(fmt, block_size)
    key_hat = fake_quantize_keys(key, fmt)
    value_hat = fake_quantize(value, fmt.value_bits, fmt.group_size)
    positions = torch.arange(query.shape[-2], device=query.device)
    return torch.stack([
        mixed_attention(q, k, v, kh, vh, positions, block_size, fmt.window, scale, softcap)
        for q, k, v, kh, vh in zip(query, key, value, key_hat, value_hat)
    ])


def read_cache_ref(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int, fmt: LayerFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V float32[H, length, D] of one sequence from its block ids (kivi: positions of
    incomplete key groups hold whatever the page holds)."""
    views = _plane_views(kv_cache, fmt)
    block_size = kv_cache.shape[2]
    positions = torch.arange(length, device=kv_cache.device)
    blocks = block_ids.long()[positions // block_size]
    offsets = positions % block_size
    value = decode(views.value_code[blocks, :, offsets].flatten(0, 1),
                   views.value_param[blocks, :, offsets].flatten(0, 1), fmt.value_bits, fmt.group_size, fmt.dtype)
    code = views.key_code[blocks, :, offsets]  # [L, H, bytes]
    if fmt.kivi_keys:
        scale, zero = _scale_zero(views.key_param[blocks, :, offsets // fmt.key_group_size])  # [L, H, D]
        key = unpack_codes(code, fmt.key_bits).float() * scale.float() + zero.float()
    else:
        key = decode(code.flatten(0, 1), views.key_param[blocks, :, offsets].flatten(0, 1), fmt.key_bits,
                     fmt.group_size, fmt.dtype)
    heads = kv_cache.shape[1]
    return key.reshape(length, heads, -1).transpose(0, 1), value.reshape(length, heads, -1).transpose(0, 1)


def paged_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    fmt: LayerFormat,
    ring_cache: torch.Tensor | None = None,
    ring_block_ids: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of query[T, Hq, D] over the packed cache, the ring and the step's own key/value
    [T, Hkv, D] (see the module docstring); returns [T, Hq, D]."""
    out = torch.empty_like(query)
    block_size = kv_cache.shape[2]
    ring_k, ring_v = _ring_views(ring_cache, fmt) if fmt.has_window else (None, None)
    for seq, start, rows, first in _sequence_rows(query_start_loc, seq_lens):
        if rows == 0:
            continue
        length = first + rows
        key_hat, value_hat = read_cache_ref(kv_cache, block_table[seq], length, fmt)
        full_k, full_v = torch.zeros_like(key_hat), torch.zeros_like(value_hat)
        full_k[:, first:] = key[start : start + rows].transpose(0, 1).float()
        full_v[:, first:] = value[start : start + rows].transpose(0, 1).float()
        if ring_k is not None:  # window positions before this step (same block, last R): from the ring
            earlier = torch.arange(int(window_start(torch.tensor(first), block_size, fmt.window)), first)
            block = int(ring_block_ids[seq])
            full_k[:, earlier] = ring_k[block, :, earlier % fmt.window].float()
            full_v[:, earlier] = ring_v[block, :, earlier % fmt.window].float()
        positions = torch.arange(first, length, device=query.device)
        attended = mixed_attention(query[start : start + rows].transpose(0, 1), full_k, full_v, key_hat, value_hat,
                                   positions, block_size, fmt.window, scale, softcap)
        out[start : start + rows] = attended.transpose(0, 1).to(query.dtype)
    return out
