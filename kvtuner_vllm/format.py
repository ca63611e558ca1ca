"""The packed KV cache format, v2: the one definition (the spec; it describes, it does not compute).

Everything that touches packed bytes follows this module: the C++ and CUDA kernels, the
backend's page-size math (`LayerFormat.bytes_per_token`, `LayerFormat.window_bytes`) and the
calibration's simulation. The pure-torch references that compute what this text says (the
quantizer, the cache write, the attention rule, `simulated_attention`) are in
`kvtuner_vllm.reference`; tests compare the kernels against them. No vLLM import.

Quantizer (asymmetric, b bits, over a group x of n values, in float32)
----------------------------------------------------------------------
    qmax    = 2^b - 1
    zero_h  = fp16(clamp(min(x), -65504, 65504))
    scale_h = fp16(min((max(x) - min(x)) / qmax, 65504))
    inv     = 1 / float(scale_h)    if scale_h > 0 else 0      # constant group: q = 0
    q       = clamp(round_half_even((x - float(zero_h)) * inv), 0, qmax)
    x_hat   = q * float(scale_h) + float(zero_h)

The fp16-rounded scale and zero are used for the codes, so x_hat is exactly what a kernel
reading the page reconstructs. b = 16 stores the model dtype unchanged.

Schemes: which values form a group
----------------------------------
* `per-token-group` (v1): for each token and KV head, the head vector (D channels) is cut
  into D/G groups of G consecutive channels (G = `group_size`). Keys and values alike.
* `kivi` (KIVI's per-channel keys): values as above; keys are grouped per *channel* over
  G_t consecutive token positions (G_t = `key_group_size`, a divisor of the block size),
  so one (scale, zero) pair per channel per token group. A key group is quantized once
  all its G_t positions are written (until then its keys are only read in full precision,
  see the window below).

Bytes (one token, one KV head)
------------------------------
    codes  = D * b / 8 (b < 16);  D * elem_size(dtype) for b = 16
    params = 4 * D / G   for per-token groups (fp16 scale + fp16 zero per group)
             4 * D / G_t for kivi keys (D pairs per G_t tokens)
             0 for b = 16

Codes are packed little end first, per token row: channel c sits in byte c*b//8 at bit
(c*b) % 8 (b = 4: channel 2i in the low nibble; b = 2: channel 4i in the lowest two bits).
Per-token params of a token are [scale_0, zero_0, scale_1, zero_1, ...] over its groups;
kivi key params of a token group are [scale_c, zero_c] for c = 0..D-1.

Page layout (one layer)
-----------------------
vLLM views a layer's cache as uint8[num_blocks, num_kv_heads, block_size, C] with
C = bytes_per_token. The block_size * C bytes of one (block, head) plane are planar,
N = block_size:

    [ K codes  N x key_code_bytes            ]
    [ K params N x key_param_bytes           ]  (kivi: N / G_t token groups x D pairs)
    [ V codes  N x value_code_bytes          ]
    [ V params N x value_param_bytes         ]

so one head's tokens are contiguous for the kernels. A 16/16 layer's page has exactly the
size of vLLM's own page; on CPU the backend hands such layers to vLLM's own kernels, which
arrange K and V inside the page their own way (ISA-specific tiles), so only they read it.

The full-precision window (residual_length R > 0)
-------------------------------------------------
Attention reads the most recent positions of a query's own block in the model dtype:
the query at position p (block size N) reads key/value j in full precision when

    j >= w0(p) = max(N * floor(p / N), p - R + 1)

and from the packed pages when j < w0(p). The window stays inside p's block, so it never
needs positions of a block that a prefix-cache hit reuses: every block boundary is a clean
start. The positions a window can need from earlier steps (at most R - 1, all in the block
being written) live in a per-request ring of R positions per layer and KV head, in the
model dtype, position j at ring row j mod R:

    ring plane (one ring block, one head) = [ K  R x D ][ V  R x D ]   (model dtype)
 A step's own positions are read from its
fresh key/value rows. For kivi, R >= G_t and G_t | N put every key group that a window
does not cover in a complete group. R = 0 is format v1: every position, the query's own
included, is read from the packed pages.

Attention semantics
-------------------
The query tokens of a sequence are its last q_len positions: query i sits at position
seq_len - q_len + i and sees keys 0..position (causal), each read as the window rule
says. Results depend on positions only, not on how the scheduler split a request into
steps, so prefill, chunked prefill, prefix-cache hits, decode and recompute after
preemption compute the same function, and `reference.simulated_attention` (what calibration runs)
computes it for whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

PER_TOKEN = "per-token-group"
KIVI = "kivi"
SCHEMES = (PER_TOKEN, KIVI)
SUPPORTED_BITS = (2, 4, 8, 16)
UNQUANTIZED_BITS = 16
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_KEY_GROUP_SIZES = (16, 32, 64, 128)  # kivi: token positions per key group
MAX_RESIDUAL_LENGTH = 256
SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)  # the CUDA attention's; the CPU takes any multiple of 16 up to 256
HEAD_SIZE_MULTIPLE = 16
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
    if head_size % HEAD_SIZE_MULTIPLE:
        raise ValueError(
            f"head size {head_size} is not a multiple of {HEAD_SIZE_MULTIPLE}, which the packed format needs"
        )
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


def check_window(scheme: str, key_group_size: int, residual_length: int) -> None:
    """The scheme's own rules: kivi needs a token group and a window that covers it."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use one of {SCHEMES}")
    if not 0 <= residual_length <= MAX_RESIDUAL_LENGTH:
        raise ValueError(f"residual_length {residual_length} must lie in [0, {MAX_RESIDUAL_LENGTH}]")
    if scheme == PER_TOKEN:
        if key_group_size:
            raise ValueError("key_group_size applies to the kivi scheme only; remove it or use scheme 'kivi'")
        return
    if key_group_size not in SUPPORTED_KEY_GROUP_SIZES:
        raise ValueError(
            f"the kivi scheme needs key_group_size (token positions per key group) in "
            f"{SUPPORTED_KEY_GROUP_SIZES}, got {key_group_size!r}"
        )
    if residual_length < key_group_size:
        raise ValueError(
            f"the kivi scheme needs residual_length >= key_group_size ({residual_length} < {key_group_size}): "
            "the full-precision window must cover the key group still being filled"
        )


def check_block_size(fmt: LayerFormat, block_size: int) -> None:
    """What the window and kivi groups need of vLLM's block size (checked at startup)."""
    if fmt.has_window and fmt.residual_length > block_size:
        raise ValueError(
            f"residual_length {fmt.residual_length} exceeds the block size {block_size}: the window lies "
            "inside a block; use --block-size >= residual_length"
        )
    if fmt.kivi_keys and block_size % fmt.key_group_size:
        raise ValueError(
            f"key_group_size {fmt.key_group_size} does not divide the block size {block_size}: "
            "kivi key groups must not straddle blocks"
        )


def code_bytes(bits: int, head_size: int, dtype: torch.dtype) -> int:
    """Bytes of one token's codes (or raw values, for 16 bits) for one head."""
    check_bits(bits)
    if bits == UNQUANTIZED_BITS:
        return head_size * dtype.itemsize
    return head_size * bits // 8


def param_bytes(bits: int, head_size: int, group_size: int) -> int:
    """Bytes of one token's scales and zeros for one head, groups of `group_size` values."""
    check_bits(bits)
    if bits == UNQUANTIZED_BITS:
        return 0
    return PARAM_BYTES_PER_GROUP * head_size // group_size


@dataclass(frozen=True)
class LayerFormat:
    """How one layer's K and V are stored and read: what the kernels take as arguments."""

    key_bits: int
    value_bits: int
    head_size: int
    group_size: int
    dtype: torch.dtype = torch.bfloat16
    scheme: str = PER_TOKEN
    key_group_size: int = 0  # kivi only: token positions per key group
    residual_length: int = 0  # R: positions of the window read in the model dtype

    def __post_init__(self) -> None:
        check_bits(self.key_bits)
        check_bits(self.value_bits)
        check_group_size(self.group_size, self.head_size)
        check_window(self.scheme, self.key_group_size, self.residual_length)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported model dtype {self.dtype}: use one of {SUPPORTED_DTYPES}")

    @property
    def unquantized(self) -> bool:
        return self.key_bits == self.value_bits == UNQUANTIZED_BITS

    @property
    def kivi_keys(self) -> bool:
        """Keys quantized per channel over token groups."""
        return self.scheme == KIVI and self.key_bits != UNQUANTIZED_BITS

    @property
    def has_window(self) -> bool:
        """Whether reads distinguish recent positions (and a ring holds them)."""
        return self.residual_length > 0 and not self.unquantized

    @property
    def window(self) -> int:
        """R as the kernels take it: 0 when the layer has no window."""
        return self.residual_length if self.has_window else 0

    @property
    def kernel_key_group_size(self) -> int:
        """G_t as the kernels take it: 0 for per-token keys."""
        return self.key_group_size if self.kivi_keys else 0

    @cached_property
    def key_code_bytes(self) -> int:
        return code_bytes(self.key_bits, self.head_size, self.dtype)

    @cached_property
    def key_param_bytes(self) -> int:
        """Key params per token (kivi: a token group's params spread over its G_t tokens)."""
        return param_bytes(self.key_bits, self.head_size, self.key_group_size if self.kivi_keys else self.group_size)

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

    @property
    def window_bytes(self) -> int:
        """Bytes of one request's ring for one KV head (0 without a window)."""
        return self.window * self.unquantized_bytes_per_token

    def plane_offsets(self, block_size: int) -> tuple[int, int, int, int]:
        """Byte offsets of K codes, K params, V codes, V params inside one (block, head) plane."""
        k_params = block_size * self.key_code_bytes
        v_codes = k_params + block_size * self.key_param_bytes
        v_params = v_codes + block_size * self.value_code_bytes
        return 0, k_params, v_codes, v_params

    def cache_shape(self, num_blocks: int, num_kv_heads: int, block_size: int) -> tuple[int, int, int, int]:
        return num_blocks, num_kv_heads, block_size, self.bytes_per_token

    def ring_shape(self, num_blocks: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        """The ring cache as vLLM views it: [blocks, heads, R, 2D] in the model dtype."""
        return num_blocks, num_kv_heads, self.window, 2 * self.head_size
