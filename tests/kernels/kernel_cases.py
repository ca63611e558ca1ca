"""Builders shared by the kernel tests: one layer step of a varlen batch over a paged cache,
and the comparison of bfloat16 kernels with an fp32 reference that a dropped key fails.

Each sequence has a history (positions written in earlier steps, by the reference writers:
packed pages and, with a window, its ring) and this step's rows. Imported as a plain module
(pytest puts this folder on sys.path for its test files).

bfloat16 outputs (check_bf16_rows)
----------------------------------
A fixed tolerance cannot tell a kernel's roundings from a missing key: an output row averages n
values (|o| ~ n^-1/2), one key moves it by ~1/n, and bf16's atol 8e-3 hides that beyond a few
hundred keys. So the reference is reference.paged_attention_ref in float32 on the very bf16 query,
keys and values the kernel reads (packed keys and values dequantized as the pages hold them), and
the bound follows from the roundings the kernel makes, with u = 2^-8 the unit roundoff of bf16
(8 significant bits: a rounded x is x (1 + d), |d| <= u):

* Output rounding. The kernel's fp32 result y is rounded once, to o_k = bf16(y), so y lies within
  half a bf16 spacing h(o_k) of o_k (bf16_half_spacing). Per channel, |y - o| >= max(0, |o_k - o|
  - h(o_k)): what is left after the output rounding is a lower bound of the kernel's own error,
  exact rather than the 2^-8 |o| a tolerance must allow.
* The kernel's roundings before it (Roundings; each test module says which its kernel makes):
  with p_t the exact probabilities of the row's keys (sum 1) and v_t the values it reads,
    probabilities rounded to bf16, the same rounded ones in the softmax sum (prefill kernel):
        y - o = sum_t p_t d_t (v_t - o)                                        (first order in u)
    values read from the pages rounded to bf16 (prefill kernel):  sum_t p_t d_t v_t
    weights p_t x value scale rounded, the sum over unrounded p (AMX decode kernel):
        sum_t p_t d_t (v_t - m_t),  m_t the value group's midpoint (codes enter centred), or 0
        for window keys (their weight is p_t itself)
  and every kernel's fp32 scores, off by at most e_t = 2^-16 x scale x sum_i |q_i k_ti| (bf16
  parts of split keys, the AMX decode's codes offset by 128): sum_t p_t e_t (v_t - o).
  A worst-case sum of these, u x sum_t p_t |v_t - o| ~ u, exceeds a dropped key's 1/n for n
  above a few hundred. But the d_t are roundings of unrelated numbers, independent with mean 0
  and |d_t| <= u, so Var(d_t) <= u^2 / 3 and the errors add up in quadrature:
        E ||y - o||^2 <= sigma^2 = sum_k sum_t p_t^2 u_k^2 ||a_tk||^2 / 3
  over the rounding kinds k and their vectors a_tk (v_t - o, v_t or v_t - m_t), per output row
  (token, query head) over its D channels: ~ u^2 D / (3 n) for n keys of similar weight.
* The check: per row, || max(0, |o_k - o| - h(o_k)) ||_2 <= 3 sigma + 2^-20 (sum_t p_t ||v_t||^2)^1/2,
  the last term for fp32 arithmetic (exp2 approximations, sums over thousands of keys). A row's
  norm sums D roundings each of several keys, so it stays near or below sigma (and a single
  dominant key, the worst case for the quadrature, errs by at most u p ||a|| = sqrt(3) sigma).
  Dropping key s moves the row by p_s ||v_s - o|| / (1 - p_s), ~ ||v|| / n against 3 sigma ~
  3 u ||v|| / sqrt(3 n): caught while n < 1 / (3 u^2) ~ 22000 keys of equal weights (half as
  many with two kinds of rounding), and keys of more than average weight from further. The
  dropped-key tests drop one key and one 16-key tile out of 3000 (Bf16Reference.without_keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import pytest
import torch

from kvtuner_vllm import format as kvformat
from kvtuner_vllm import reference as kvref

# The CUDA cases exist everywhere and skip where no GPU is, so that a run on a CPU machine lists what it
# did not prove (scripts/gpu_check.sh runs them on a GPU).
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]

# The bit pairs the calibration searches over, plus the unquantized and mixed-16 corners.
ATTENTION_BIT_PAIRS = [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2), (16, 16), (16, 4), (2, 8)]

# Output tolerance against the reference: both compute in fp32 from the same dequantized and
# full-precision keys and values, and only the order of the additions differs, so the gap is
# the final rounding to the dtype (1 ulp: 2^-8 relative for bf16, 2^-11 for fp16) plus fp32 noise.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 8e-3, "rtol": 1.6e-2},
}


def layer_format(key_bits: int, value_bits: int, head_size: int, group_size: int, dtype=torch.bfloat16, *,
                 window: int = 0, key_group_size: int = 0) -> kvformat.LayerFormat:
    """A format of either scheme: key_group_size > 0 means kivi keys (its window must be >= it)."""
    scheme = kvformat.KIVI if key_group_size else kvformat.PER_TOKEN
    return kvformat.LayerFormat(key_bits, value_bits, head_size, group_size, dtype, scheme=scheme,
                                key_group_size=key_group_size, residual_length=window)


@dataclass
class PagedBatch:
    """One step of a varlen batch: the caches as the earlier steps left them, this step's rows."""

    fmt: kvformat.LayerFormat
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D]: this step's rows
    value: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [T]
    cache_before: torch.Tensor  # uint8 [B, Hkv, N, C] before this step's write
    kv_cache: torch.Tensor  # after this step's reference write: what attention reads
    ring_cache: torch.Tensor | None  # [R_blocks, Hkv, R, 2D], filled by the earlier steps
    ring_block_ids: torch.Tensor | None  # int32 [S]
    block_table: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]
    query_start_loc: torch.Tensor  # int32 [S + 1]
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D]: every position, as written
    values: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[2]

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def to(self, device: str) -> PagedBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def _slots(block_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_row[positions // block_size].long() * block_size + positions % block_size


def make_batch(
    fmt: kvformat.LayerFormat,
    seq_lens: list[int],
    query_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    seed: int = 0,
) -> PagedBatch:
    """Sequence s has seq_lens[s] positions, the last query_lens[s] of them this step's rows.

    Its history is written in one earlier step by the reference writers into shuffled blocks
    (spare blocks and unwritten slots hold random bytes, rings random values: whatever a kernel
    must not read). Keys get a per-channel offset (as real keys have outlier channels) so that
    groups have different ranges; values are standard normal.
    """
    generator = torch.Generator().manual_seed(seed)
    head_size, dtype, num_seqs = fmt.head_size, fmt.dtype, len(seq_lens)
    blocks_per_seq = max(math.ceil(length / block_size) for length in seq_lens)
    num_blocks = num_seqs * blocks_per_seq + 3
    block_ids = torch.randperm(num_blocks, generator=generator)[: num_seqs * blocks_per_seq]
    block_table = block_ids.view(num_seqs, blocks_per_seq).to(torch.int32)
    kv_cache = torch.randint(0, 256, fmt.cache_shape(num_blocks, num_kv_heads, block_size), dtype=torch.uint8,
                             generator=generator)
    ring_cache = ring_block_ids = None
    if fmt.has_window:
        ring_cache = torch.randn(fmt.ring_shape(num_seqs + 2, num_kv_heads), generator=generator).to(dtype)
        ring_block_ids = torch.randperm(num_seqs + 2, generator=generator)[:num_seqs].to(torch.int32)
    channel_offset = torch.randn(num_kv_heads, head_size, generator=generator) * 2
    keys = [(torch.randn(n, num_kv_heads, head_size, generator=generator) + channel_offset).to(dtype) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_size, generator=generator).to(dtype) for n in seq_lens]
    for seq, (length, rows) in enumerate(zip(seq_lens, query_lens, strict=True)):
        history = length - rows
        if history == 0:
            continue
        one_seq = {"query_start_loc": torch.tensor([0, history], dtype=torch.int32),
                   "seq_lens": torch.tensor([history], dtype=torch.int32)}
        ring_id = None if ring_block_ids is None else ring_block_ids[seq : seq + 1]
        kvref.quantize_and_cache_ref(keys[seq][:history], values[seq][:history], kv_cache,
                                        _slots(block_table[seq], torch.arange(history), block_size), fmt,
                                        ring_cache=ring_cache, ring_block_ids=ring_id, **one_seq)
        if ring_cache is not None:
            kvref.write_window_ref(keys[seq][:history], values[seq][:history], ring_cache, ring_id,
                                      fmt=fmt, **one_seq)
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    key = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens, strict=True)])
    value = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens, strict=True)])
    slot_mapping = torch.cat([_slots(block_table[s], torch.arange(n - q, n), block_size)
                              for s, (n, q) in enumerate(zip(seq_lens, query_lens, strict=True))])
    query = torch.randn(key.shape[0], num_q_heads, head_size, generator=generator).to(dtype)
    cache_before = kv_cache.clone()
    kvref.quantize_and_cache_ref(key, value, kv_cache, slot_mapping, fmt, query_start_loc, seq_lens_t, ring_cache,
                                    ring_block_ids)
    return PagedBatch(fmt, query, key, value, slot_mapping, cache_before, kv_cache, ring_cache, ring_block_ids,
                      block_table, seq_lens_t, query_start_loc, keys, values)


def reference_attention(batch: PagedBatch, scale: float, softcap: float | None = None) -> torch.Tensor:
    return kvref.paged_attention_ref(batch.query, batch.key, batch.value, batch.kv_cache, batch.block_table,
                                        batch.seq_lens, batch.query_start_loc, scale, batch.fmt, batch.ring_cache,
                                        batch.ring_block_ids, softcap)


# ---------------------------------------------------------------------------------------
# bfloat16 outputs against an fp32 reference, within the kernel's own roundings
# ---------------------------------------------------------------------------------------

BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest even)
SIGMAS = 3.0  # rows may err by this many standard deviations of the rounding model
SCORE_ERROR = 2.0**-16  # relative error of a score, per unit of scale * sum_i |q_i k_i|
FP32_SLACK = 2.0**-20  # fp32 arithmetic, per unit of the row's rms value norm


@dataclass(frozen=True)
class Roundings:
    """The bf16 roundings (their unit roundoff; 0: none) a kernel makes before its output's own:

    probs          each probability p_t, with the rounded p_t also in the softmax sum:
                   the output moves by p_t d (v_t - o)
    packed_values  each value read from the pages: p_t d v_t
    weights        each weight p_t x value scale, the sum keeping p_t: p_t d (v_t - m_t), m_t the
                   value group's midpoint (code 2^(b-1)) for packed keys, 0 for window keys
    """

    probs: float = 0.0
    packed_values: float = 0.0
    weights: float = 0.0


@dataclass
class _SequenceTerms:
    """One sequence's keys as its rows read them; rows [Hkv, group x q]: the query heads of a KV
    head one after the other, each with the sequence's q tokens."""

    rows: slice  # the sequence's rows of the batch
    probs: torch.Tensor  # [Hkv, group x q, L] float64: the exact softmax of the scores; 0 where not read
    packed: torch.Tensor  # [group x q, L] bool: the key is read from the pages
    value: torch.Tensor  # [Hkv, L, D] float64: in full precision
    value_hat: torch.Tensor  # [Hkv, L, D] float64: as the pages hold it
    value_mid: torch.Tensor  # [Hkv, L, D] float64: the midpoint of each value's group on the pages
    score_error: torch.Tensor  # [Hkv, group x q, L] float64: bound on a kernel's error of each score

    def to_batch_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[Hkv, group x q, ...] -> [q, Hq, ...]"""
        tokens = self.rows.stop - self.rows.start
        return x.unflatten(1, (-1, tokens)).flatten(0, 1).transpose(0, 1)

    def from_batch_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[q, Hq, ...] -> [Hkv, group x q, ...]"""
        return x.transpose(0, 1).unflatten(0, (self.value.shape[0], -1)).flatten(1, 2)


@dataclass
class Bf16Reference:
    """fp32 attention of a batch's bf16 inputs (kernel_cases.bf16_reference), with what it takes to
    bound a bf16 kernel's error: out [T, Hq, D] and, per output row, sigma [T, Hq] and slack [T, Hq]."""

    out: torch.Tensor
    sigma: torch.Tensor
    slack: torch.Tensor
    terms: list[_SequenceTerms]

    def without_keys(self, positions: list[int]) -> torch.Tensor:
        """The reference output if every row of every sequence skipped the keys at `positions`
        (which they all read from the pages): o' = (o - sum_S p v) / (1 - sum_S p)."""
        out = self.out.double().clone()
        for t in self.terms:
            dropped = torch.zeros(t.probs.shape[-1], dtype=torch.bool)
            dropped[positions] = True
            assert t.packed[:, dropped].all(), "every row must read the dropped keys from the pages"
            p = t.probs * dropped
            kept = 1 - p.sum(-1, keepdim=True)
            out[t.rows] = t.to_batch_rows((t.from_batch_rows(out[t.rows]) - p @ t.value_hat) / kept)
        return out.float()


def _value_midpoints(batch: PagedBatch) -> torch.Tensor:
    """A copy of the cache whose value codes all hold 2^(b-1): read back, each value group's midpoint."""
    fmt = batch.fmt
    cache = batch.kv_cache.clone()
    if fmt.value_bits == kvformat.UNQUANTIZED_BITS:
        return cache
    per_byte = 8 // fmt.value_bits
    mid_byte = int(kvref.pack_codes(torch.full((per_byte,), 2 ** (fmt.value_bits - 1), dtype=torch.uint8),
                                       fmt.value_bits))
    _, _, begin, end = fmt.plane_offsets(batch.block_size)
    cache.flatten(2)[:, :, begin:end] = mid_byte
    return cache


def _sequence_terms(batch: PagedBatch, seq: int, mid_cache: torch.Tensor, scale: float,
                    softcap: float | None) -> _SequenceTerms:
    fmt = batch.fmt
    start, end = int(batch.query_start_loc[seq]), int(batch.query_start_loc[seq + 1])
    length = int(batch.seq_lens[seq])
    num_kv_heads = batch.keys[seq].shape[1]
    group = batch.query.shape[1] // num_kv_heads
    key_hat, value_hat = (t.double() for t in kvref.read_cache_ref(batch.kv_cache, batch.block_table[seq], length,
                                                                      fmt))
    value_mid = kvref.read_cache_ref(mid_cache, batch.block_table[seq], length, fmt)[1].double()
    key, value = (t[:length].transpose(0, 1).double() for t in (batch.keys[seq], batch.values[seq]))
    positions = torch.arange(length - (end - start), length).repeat(group)  # of the rows [group x q]
    keys = torch.arange(length)
    packed = keys < kvref.window_start(positions, batch.block_size, fmt.window)[:, None]
    q = batch.query[start:end].double().transpose(0, 1).unflatten(0, (num_kv_heads, -1)).flatten(1, 2)
    scores = torch.where(packed, q @ key_hat.transpose(1, 2), q @ key.transpose(1, 2)) * scale
    magnitude = torch.where(packed, q.abs() @ key_hat.abs().transpose(1, 2), q.abs() @ key.abs().transpose(1, 2))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(keys > positions[:, None], -math.inf).softmax(-1)
    return _SequenceTerms(slice(start, end), probs, packed, value, value_hat, value_mid,
                          SCORE_ERROR * scale * magnitude)


def _weighted_square_norms(w: torch.Tensor, values: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w[h, r, t] ||values[h, t] - centre[h, r]||^2 -> [Hkv, rows] (centre None: 0)."""
    total = (w @ values.square().sum(-1, keepdim=True)).squeeze(-1)
    if centre is None:
        return total
    # expanded (a sum of squares), so it may round below 0 where every value equals the centre
    return (total - 2 * (centre * (w @ values)).sum(-1) + w.sum(-1) * centre.square().sum(-1)).clamp(min=0)


def _spread(t: _SequenceTerms, w: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """_weighted_square_norms over the values as each row reads them (packed: value_hat, else value)."""
    return _weighted_square_norms(w * t.packed, t.value_hat, centre) + _weighted_square_norms(w * ~t.packed, t.value,
                                                                                             centre)


def _row_variance(t: _SequenceTerms, out: torch.Tensor, roundings: Roundings) -> torch.Tensor:
    """[Hkv, rows]: the bound on E||e||^2 of check_bf16_rows' model, each error d_k uniform in +-u_k."""
    p2 = t.probs.square()
    variance = _spread(t, p2 * t.score_error.square(), out)
    variance += roundings.probs**2 * _spread(t, p2, out)
    variance += roundings.packed_values**2 * _weighted_square_norms(p2 * t.packed, t.value_hat)
    variance += roundings.weights**2 * (_weighted_square_norms(p2 * t.packed, t.value_hat - t.value_mid)
                                        + _weighted_square_norms(p2 * ~t.packed, t.value))
    return variance / 3


def bf16_reference(batch: PagedBatch, scale: float, roundings: Roundings, softcap: float | None = None
                   ) -> Bf16Reference:
    """reference.paged_attention_ref in float32 on the batch's bf16 inputs, and per output row what
    check_bf16_rows needs to bound the error of a kernel that makes `roundings`."""
    expected = kvref.paged_attention_ref(batch.query.float(), batch.key.float(), batch.value.float(),
                                            batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc,
                                            scale, batch.fmt, batch.ring_cache, batch.ring_block_ids, softcap)
    mid_cache = _value_midpoints(batch)
    variance = torch.zeros(batch.query.shape[:2], dtype=torch.float64)
    slack = torch.zeros(batch.query.shape[:2], dtype=torch.float64)
    terms = []
    for seq in range(len(batch.keys)):
        if int(batch.query_start_loc[seq + 1]) == int(batch.query_start_loc[seq]):
            continue
        t = _sequence_terms(batch, seq, mid_cache, scale, softcap)
        terms.append(t)
        out = (t.probs * t.packed) @ t.value_hat + (t.probs * ~t.packed) @ t.value  # [Hkv, rows, D]
        torch.testing.assert_close(t.to_batch_rows(out).float(), expected[t.rows], atol=1e-5, rtol=1e-5)
        variance[t.rows] = t.to_batch_rows(_row_variance(t, out, roundings))
        slack[t.rows] = t.to_batch_rows(FP32_SLACK * _spread(t, t.probs).sqrt())
    return Bf16Reference(expected, variance.sqrt(), slack, terms)


def bf16_half_spacing(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bf16 numbers around each (bf16) x: |x| in [2^e, 2^(e+1)) -> 2^(e-8)."""
    _, exponent = torch.frexp(x.float())  # |x| = m 2^exponent, m in [0.5, 1)
    return torch.where(x == 0, 0.0, torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 9))


def bf16_row_excess(actual: torch.Tensor, ref: Bf16Reference, expected: torch.Tensor | None = None) -> torch.Tensor:
    """[T, Hq]: each row's error beyond its output rounding, over its bound (<= 1: within it).

    `expected` (default ref.out) is the reference the rows are compared with."""
    expected = ref.out if expected is None else expected
    beyond = ((actual.float() - expected).abs() - bf16_half_spacing(actual)).clamp(min=0)
    return beyond.double().norm(dim=-1) / (SIGMAS * ref.sigma + ref.slack)


def check_bf16_rows(actual: torch.Tensor, ref: Bf16Reference, expected: torch.Tensor | None = None) -> None:
    """Every row of `actual` within its bound of `expected` (default ref.out); see the module docstring."""
    excess = bf16_row_excess(actual, ref, expected)
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 1, (f"row {divmod(worst, excess.shape[1])} errs {float(excess.max()):.3g}x its bound "
                               f"(sigma {float(ref.sigma.flatten()[worst]):.3g})")
