"""The packed KV cache format, v1 (per-token groups): the one definition.

Everything that touches packed bytes follows this module: the C++ and CUDA kernels
(tests compare them against the reference functions below), the backend's page-size
math (`LayerFormat.bytes_per_token`) and the calibration's simulated quantizer
(`fake_quantize`). Pure torch, no vLLM import.

Quantization (per token, per KV head, per group of G consecutive channels)
--------------------------------------------------------------------------
For a head vector x of length D cut into D/G groups, each group is quantized
asymmetrically to b bits, in float32 arithmetic:

    qmax    = 2^b - 1
    zero_h  = fp16(clamp(min(x), -65504, 65504))
    scale_h = fp16(min((max(x) - min(x)) / qmax, 65504))
    inv     = 1 / float(scale_h)    if scale_h > 0 else 0      # constant group: q = 0
    q       = clamp(round_half_even((x - float(zero_h)) * inv), 0, qmax)
    x_hat   = q * float(scale_h) + float(zero_h)

The fp16-rounded scale and zero are used for the codes, so x_hat is exactly what a
kernel reading the page reconstructs. b = 16 stores the model dtype unchanged.

Bytes (one token, one KV head)
------------------------------
    codes  = D * b / 8                   (b < 16);  D * elem_size(dtype) for b = 16
    params = 4 * D / G  (fp16 scale, fp16 zero per group);  0 for b = 16

Codes are packed little end first: channel c sits in byte c*b//8 at bit (c*b) % 8
(b = 4: channel 2i in the low nibble; b = 2: channel 4i in the lowest two bits).
Params of a token are interleaved per group: [scale_0, zero_0, scale_1, zero_1, ...].

Page layout (one layer)
-----------------------
vLLM views a layer's cache as uint8[num_blocks, num_kv_heads, block_size, C] with
C = bytes_per_token = key codes + key params + value codes + value params. The
block_size * C bytes of one (block, head) plane are planar, N = block_size:

    [ K codes  N x key_code_bytes   ]  offset 0
    [ K params N x key_param_bytes  ]  offset N * key_code_bytes
    [ V codes  N x value_code_bytes ]  offset N * (key_code_bytes + key_param_bytes)
    [ V params N x value_param_bytes]  offset N * (... + value_code_bytes)

so one head's tokens are contiguous for the decode kernel, and a 16/16 layer is
byte-identical to vLLM's CPU bf16 page ([B, H, N, 2D] = K plane then V plane).

Attention semantics
-------------------
Every query attends over the packed cache only, its own step's keys included:
`quantize_and_cache` runs before attention in every step. The query tokens of a
sequence are its last q_len positions; query i sits at position seq_len - q_len + i
and sees keys 0..position (causal), restricted to the last `sliding_window` positions
if set. Prefill, chunked prefill, prefix-cache hits and decode therefore compute the
same function, and calibration (which fake-quantizes K and V before attention) scores
exactly what the server computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

FORMAT_VERSION = "kvtuner-packed/v1"
SCHEME = "per-token-group"
SUPPORTED_BITS = (2, 4, 8, 16)
UNQUANTIZED_BITS = 16
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP16_MAX = 65504.0
PARAM_BYTES_PER_GROUP = 4  # fp16 scale + fp16 zero


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bit width {bits!r}: use one of {SUPPORTED_BITS} "
            f"({UNQUANTIZED_BITS} stores the model dtype unquantized)"
        )


def check_group_size(group_size: int, head_size: int) -> None:
    """A group is G consecutive channels; G must tile the head exactly."""
    if head_size % 16:
        raise ValueError(f"head size {head_size} is not a multiple of 16, which the packed format needs")
    if group_size != head_size and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"unsupported group size {group_size}: use one of {SUPPORTED_GROUP_SIZES} "
            f"or the head size ({head_size})"
        )
    if head_size % group_size:
        raise ValueError(
            f"group size {group_size} does not divide head size {head_size}: choose a group size "
            f"that divides it ({[g for g in SUPPORTED_GROUP_SIZES if head_size % g == 0] or [head_size]})"
        )


def code_bytes(bits: int, head_size: int, dtype: torch.dtype) -> int:
    """Bytes of one token's codes (or raw values, for 16 bits) for one head."""
    check_bits(bits)
    if bits == UNQUANTIZED_BITS:
        return head_size * dtype.itemsize
    return head_size * bits // 8


def param_bytes(bits: int, head_size: int, group_size: int) -> int:
    """Bytes of one token's scales and zeros for one head (none when unquantized)."""
    check_bits(bits)
    if bits == UNQUANTIZED_BITS:
        return 0
    return PARAM_BYTES_PER_GROUP * head_size // group_size


@dataclass(frozen=True)
class LayerFormat:
    """How one layer's K and V are stored: what the kernels take as arguments."""

    key_bits: int
    value_bits: int
    head_size: int
    group_size: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        check_bits(self.key_bits)
        check_bits(self.value_bits)
        check_group_size(self.group_size, self.head_size)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported model dtype {self.dtype}: use one of {SUPPORTED_DTYPES}")

    @property
    def num_groups(self) -> int:
        return self.head_size // self.group_size

    @cached_property
    def key_code_bytes(self) -> int:
        return code_bytes(self.key_bits, self.head_size, self.dtype)

    @cached_property
    def key_param_bytes(self) -> int:
        return param_bytes(self.key_bits, self.head_size, self.group_size)

    @cached_property
    def value_code_bytes(self) -> int:
        return code_bytes(self.value_bits, self.head_size, self.dtype)

    @cached_property
    def value_param_bytes(self) -> int:
        return param_bytes(self.value_bits, self.head_size, self.group_size)

    @cached_property
    def bytes_per_token(self) -> int:
        """C: bytes of one token of one KV head, K and V together (vLLM's state_content_bytes)."""
        return self.key_code_bytes + self.key_param_bytes + self.value_code_bytes + self.value_param_bytes

    @property
    def unquantized_bytes_per_token(self) -> int:
        return 2 * self.head_size * self.dtype.itemsize

    @property
    def compression(self) -> float:
        return self.unquantized_bytes_per_token / self.bytes_per_token

    def plane_offsets(self, block_size: int) -> tuple[int, int, int, int]:
        """Byte offsets of K codes, K params, V codes, V params inside one (block, head) plane."""
        k_params = block_size * self.key_code_bytes
        v_codes = k_params + block_size * self.key_param_bytes
        v_params = v_codes + block_size * self.value_code_bytes
        return 0, k_params, v_codes, v_params

    def cache_shape(self, num_blocks: int, num_kv_heads: int, block_size: int) -> tuple[int, int, int, int]:
        return num_blocks, num_kv_heads, block_size, self.bytes_per_token


# ---------------------------------------------------------------------------------
# Reference quantizer
# ---------------------------------------------------------------------------------


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x[..., D] -> (codes uint8[..., D], scale fp16[..., D/G], zero fp16[..., D/G])."""
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
    """What the server stores and reads back, in x's dtype; identity for 16 bits."""
    if bits == UNQUANTIZED_BITS:
        return x
    return dequantize(*quantize(x, bits, group_size), group_size).to(x.dtype)


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


def encode(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T, D] -> (code bytes uint8[T, code_bytes], param bytes uint8[T, param_bytes])."""
    if bits == UNQUANTIZED_BITS:
        return x.contiguous().view(torch.uint8), x.new_empty((x.shape[0], 0), dtype=torch.uint8)
    codes, scale, zero = quantize(x, bits, group_size)
    params = torch.stack([scale, zero], dim=-1).flatten(-2).contiguous().view(torch.uint8)
    return pack_codes(codes, bits), params


def decode(code: torch.Tensor, params: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode`, in float32: (uint8[T, code_bytes], uint8[T, param_bytes]) -> [T, D]."""
    if bits == UNQUANTIZED_BITS:
        return code.contiguous().view(dtype).float()
    scale_zero = params.contiguous().view(torch.float16).unflatten(-1, (-1, 2))
    return dequantize(unpack_codes(code, bits), scale_zero[..., 0], scale_zero[..., 1], group_size)


# ---------------------------------------------------------------------------------
# Reference paged cache write and attention
# ---------------------------------------------------------------------------------


def _plane_views(kv_cache: torch.Tensor, fmt: LayerFormat) -> tuple[torch.Tensor, ...]:
    """Views of a layer cache uint8[B, H, N, C] as (k_code, k_param, v_code, v_param), each [B, H, N, bytes]."""
    num_blocks, num_heads, block_size, width = kv_cache.shape
    if width != fmt.bytes_per_token:
        raise ValueError(f"cache holds {width} bytes per token, format needs {fmt.bytes_per_token}")
    planes = kv_cache.flatten(2)  # [B, H, N*C], contiguous per (block, head) plane
    sizes = (fmt.key_code_bytes, fmt.key_param_bytes, fmt.value_code_bytes, fmt.value_param_bytes)
    views = []
    for offset, size in zip(fmt.plane_offsets(block_size), sizes):
        views.append(planes[:, :, offset : offset + block_size * size].unflatten(-1, (block_size, size)))
    return tuple(views)


def quantize_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: LayerFormat,
) -> None:
    """Write key/value [T, H, D] into kv_cache uint8[B, H, N, C] at slot_mapping[T]; slot < 0 is skipped."""
    k_code, k_param, v_code, v_param = _plane_views(kv_cache, fmt)
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    for x, bits, code_view, param_view in (
        (key[valid], fmt.key_bits, k_code, k_param),
        (value[valid], fmt.value_bits, v_code, v_param),
    ):
        tokens, heads, head_size = x.shape
        code, params = encode(x.reshape(tokens * heads, head_size), bits, fmt.group_size)
        code_view[blocks, :, offsets] = code.view(tokens, heads, -1)
        param_view[blocks, :, offsets] = params.view(tokens, heads, -1)


def read_cache_ref(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int, fmt: LayerFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V float32[H, length, D] of one sequence, from its block ids."""
    k_code, k_param, v_code, v_param = _plane_views(kv_cache, fmt)
    block_size = kv_cache.shape[2]
    positions = torch.arange(length, device=kv_cache.device)
    blocks = block_ids.long()[positions // block_size]
    offsets = positions % block_size
    out = []
    for bits, code_view, param_view in ((fmt.key_bits, k_code, k_param), (fmt.value_bits, v_code, v_param)):
        code = code_view[blocks, :, offsets]  # [L, H, bytes]
        params = param_view[blocks, :, offsets]
        tokens, heads = code.shape[:2]
        x = decode(code.flatten(0, 1), params.flatten(0, 1), bits, fmt.group_size, fmt.dtype)
        out.append(x.view(tokens, heads, -1).transpose(0, 1))
    return out[0], out[1]


def paged_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    fmt: LayerFormat,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of query[T, Hq, D] over the packed cache (see the module docstring); returns [T, Hq, D]."""
    out = torch.empty_like(query)
    num_q_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[1]
    for seq in range(seq_lens.numel()):
        start, end = int(query_start_loc[seq]), int(query_start_loc[seq + 1])
        if end == start:
            continue
        length = int(seq_lens[seq])
        k, v = read_cache_ref(kv_cache, block_table[seq], length, fmt)
        k = k.repeat_interleave(num_q_heads // num_kv_heads, dim=0)  # [Hq, L, D]
        v = v.repeat_interleave(num_q_heads // num_kv_heads, dim=0)
        q = query[start:end].float().transpose(0, 1)  # [Hq, q_len, D]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        positions = torch.arange(length - (end - start), length, device=query.device).unsqueeze(-1)
        keys = torch.arange(length, device=query.device).unsqueeze(0)
        visible = keys <= positions
        if sliding_window:
            visible &= keys > positions - sliding_window
        scores = scores.masked_fill(~visible, -math.inf)
        out[start:end] = torch.matmul(scores.softmax(dim=-1), v).transpose(0, 1).to(query.dtype)
    return out
