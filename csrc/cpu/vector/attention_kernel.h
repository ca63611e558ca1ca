// The vector kernel of one attention work item (attention_isa.h), included by one translation
// unit per ISA after its `#pragma GCC target`: everything here has internal linkage, so each
// unit compiles its own copy for its ISA. Per item, chunks of keys are turned into fp32 tiles
// (dequantized from the packed pages, or loaded from the ring and the step's own rows for the
// full-precision window) and every query row that sees part of a chunk updates its online
// softmax with them.
//
// Include order in a unit: attention_isa.h and cpu/common/simd.h (every standard header the kernel
// uses, compiled for the default target), then the pragma, then this file.
#pragma once

#include "cpu/vector/attention_isa.h"
#include "cpu/common/simd_isa.h"
#include "packed_format.h"

namespace kvtuner::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Kernels are templated on kVecs = D / 16, so that loops over a head unroll and a row of q or
// of the output accumulator lives in registers; kVecs = 0 is the generic version (D read at run
// time).
#define KVT_VECS(kVecs, head_size) ((kVecs) > 0 ? (kVecs) : (head_size) / kLanes)
constexpr int kMaxVecs = kMaxHeadSize / kLanes;

// ---------------------------------------------------------------------------------------
// Dequantizing packed tokens into a tile
// ---------------------------------------------------------------------------------------

// Lane j (bits j*kBits .. j*kBits + kBits - 1) of 16 code bytes, as floats.
template <int kBits>
KVT_INLINE Vec16 code_lane(Int16 bytes, int j) {
  if constexpr (kBits == 8) return int_to_float(bytes);
  if (j == 8 / kBits - 1) return int_to_float(bytes >> (j * kBits));  // the top bits: nothing above them
  return int_to_float((bytes >> (j * kBits)) & ((1 << kBits) - 1));
}

// The first run_bytes (< 16) bytes of a run, zero-padded, widened.
KVT_INLINE Int16 widen_short_run(const uint8_t* codes, int run_bytes) {
  uint8_t bytes[kRunBytes] = {};
  std::memcpy(bytes, codes, run_bytes);
  return widen_bytes(bytes);
}

// The short last run of a head (head sizes 80 and 96): one group, fewer bytes.
template <int kBits, class Params>
KVT_INLINE void dequantize_short_run(const uint8_t* __restrict codes, int run, int base, int run_bytes,
                                     const Params& params, float* __restrict out) {
  const Int16 bytes = widen_short_run(codes + base * kBits / 8, run_bytes);
  for (int j = 0; j < 8 / kBits; ++j) {
    const int position = base + j * run_bytes;
    const Vec16 value = code_lane<kBits>(bytes, j) * params.short_scale(run, position, run_bytes) +
                        params.short_zero(run, position, run_bytes);
    std::memcpy(out + position, &value, sizeof(float) * run_bytes);
  }
}

constexpr int kMaxRuns = kMaxHeadSize / kRunBytes;

// Where each run's (scale, zero) pair sits among a token's params, for its first and second half
// of bytes (a 2-bit run is 64 channels: with G = 32 its bytes 8..15 belong to the next group);
// computed once per chunk.
template <int kBits>
struct RunGroups {
  int first[kMaxRuns], second[kMaxRuns];

  KVT_INLINE RunGroups(int head_size, int group_size) {
    constexpr int kRunChannels = kRunBytes * 8 / kBits;
    for (int run = 0; run * kRunChannels < head_size; ++run) {
      first[run] = 2 * (run * kRunChannels / group_size);
      second[run] = 2 * (std::min(run * kRunChannels + kRunChannels / 2, head_size - 1) / group_size);
    }
  }
};

// Per-token groups: one (scale, zero) per G channels of the token, `sz` = [scale, zero] per group.
template <int kBits>
struct TokenGroupParams {
  const float* sz;
  const RunGroups<kBits>& groups;

  KVT_INLINE Vec16 run_param(int run, int which) const {
    const Vec16 first = broadcast(sz[groups.first[run] + which]);
    if constexpr (kBits != 2) return first;
    const Int16 upper = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
    return upper ? broadcast(sz[groups.second[run] + which]) : first;
  }
  // A short run lies in one group.
  KVT_INLINE Vec16 short_scale(int run, int, int) const { return broadcast(sz[groups.first[run]]); }
  KVT_INLINE Vec16 short_zero(int run, int, int) const { return broadcast(sz[groups.first[run] + 1]); }
};

#if KVT_ISA_AVX512
// 4 bits with AVX-512: a full run (32 channels) lies in one group, whose 16 possible values
// iota * scale + zero fit one register; vpermps looks the codes up (it reads the low 4 bits of
// each lane, so neither nibble needs a mask). The FMA gives each value exactly as code * scale +
// zero would.
KVT_INLINE void dequantize_runs_4bit(const uint8_t* __restrict codes, const TokenGroupParams<4>& params, int runs,
                                     float* __restrict out) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int run = 0; run < runs; ++run) {
    const __m512i bytes = (__m512i)widen_bytes(codes + run * 16);
    const float* sz = params.sz + params.groups.first[run];
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(sz[0]), _mm512_set1_ps(sz[1]));
    _mm512_storeu_ps(out + run * 32, _mm512_maskz_permutexvar_ps(kAllLanes, bytes, table));
    _mm512_storeu_ps(out + run * 32 + 16,
                     _mm512_maskz_permutexvar_ps(kAllLanes, _mm512_maskz_srli_epi32(kAllLanes, bytes, 4), table));
  }
}
#endif

template <int kBits>
KVT_INLINE void dequantize_token(const uint8_t* __restrict codes, const TokenGroupParams<kBits>& params,
                                 int head_size, float* __restrict out) {
  constexpr int kPerByte = 8 / kBits, kRunChannels = kRunBytes * kPerByte;
  int run = 0, base = 0;
#if KVT_ISA_AVX512
  if constexpr (kBits == 4) {
    run = head_size / kRunChannels;
    base = run * kRunChannels;
    dequantize_runs_4bit(codes, params, run, out);
  }
#endif
  for (; base + kRunChannels <= head_size; base += kRunChannels, ++run) {
    const Int16 bytes = widen_bytes(codes + base / kPerByte);
    const Vec16 scale = params.run_param(run, 0), zero = params.run_param(run, 1);
    for (int j = 0; j < kPerByte; ++j) store16(out + base + j * kLanes, code_lane<kBits>(bytes, j) * scale + zero);
  }
  if (base < head_size) dequantize_short_run<kBits>(codes, run, base, (head_size - base) / kPerByte, params, out);
}

// Kivi keys: one (scale, zero) per channel for a token group, given in tile order.
struct ChannelParams {
  const float* scale_tile;
  const float* zero_tile;

  KVT_INLINE Vec16 short_scale(int, int position, int n) const { return partial_load(scale_tile + position, n); }
  KVT_INLINE Vec16 short_zero(int, int position, int n) const { return partial_load(zero_tile + position, n); }
  static KVT_INLINE Vec16 partial_load(const float* p, int n) {
    Vec16 v = {};
    std::memcpy(&v, p, sizeof(float) * n);
    return v;
  }
};

template <int kBits>
KVT_INLINE void dequantize_token_channels(const uint8_t* __restrict codes, const ChannelParams& params, int head_size,
                                          float* __restrict out) {
  constexpr int kPerByte = 8 / kBits, kRunChannels = kRunBytes * kPerByte;
  int base = 0;
  for (; base + kRunChannels <= head_size; base += kRunChannels) {
    const Int16 bytes = widen_bytes(codes + base / kPerByte);
    for (int j = 0; j < kPerByte; ++j) {
      const int position = base + j * kLanes;
      store16(out + position,
              code_lane<kBits>(bytes, j) * load16(params.scale_tile + position) + load16(params.zero_tile + position));
    }
  }
  if (base < head_size) dequantize_short_run<kBits>(codes, 0, base, (head_size - base) / kPerByte, params, out);
}

// Where K or V of a (block, head) plane lies, and how it is quantized.
struct PlaneSide {
  int64_t codes_offset, params_offset, code_bytes, param_bytes;
  int bits;
  int token_group;  // kivi keys: G_t (params per channel per token group); 0: per-token groups
};

// Kivi key params of token group `group` of a plane -> channel_scale/zero in tile order.
KVT_INLINE void load_channel_params(const uint8_t* plane, const PlaneSide& side, int group, int head_size,
                                    const ItemScratch& s) {
  const uint8_t* params = plane + side.params_offset + int64_t(group) * kParamBytesPerGroup * head_size;
  halves_to_float_array(params, 2 * head_size, s.row);
  for (int c = 0; c < head_size; ++c) {
    s.channel_scale[s.key_order[c]] = s.row[2 * c];
    s.channel_zero[s.key_order[c]] = s.row[2 * c + 1];
  }
}

// kVecs = D / 16 when the head size is a compile-time constant (0: read it at run time), so
// that the loops over a token's runs unroll.
template <int kBits, int kVecs>
KVT_INLINE void dequantize_tokens(const uint8_t* plane, const PlaneSide& side, int offset, int count,
                                  int runtime_head_size, int group_size, const ItemScratch& s, float* __restrict out) {
  const int head_size = KVT_VECS(kVecs, runtime_head_size) * kLanes;
  const int code_bytes = head_size * kBits / 8;
  const uint8_t* codes = plane + side.codes_offset + int64_t(offset) * code_bytes;
  if (side.token_group > 0) {
    for (int t = 0; t < count;) {
      const int group = (offset + t) / side.token_group;
      const int group_end = std::min(count, (group + 1) * side.token_group - offset);
      load_channel_params(plane, side, group, head_size, s);
      const ChannelParams params{s.channel_scale, s.channel_zero};
      for (; t < group_end; ++t) {
        dequantize_token_channels<kBits>(codes + t * code_bytes, params, head_size, out + t * head_size);
      }
    }
    return;
  }
  const int param_floats = int(side.param_bytes / 2);
  halves_to_float_array(plane + side.params_offset + int64_t(offset) * side.param_bytes, count * param_floats,
                        s.params);
  const RunGroups<kBits> groups(head_size, group_size);
  for (int t = 0; t < count; ++t) {
    const TokenGroupParams<kBits> params{s.params + t * param_floats, groups};
    dequantize_token<kBits>(codes + t * code_bytes, params, head_size, out + t * head_size);
  }
}

// Positions [offset, offset + count) of one side of a plane -> fp32 [count][D] in tile order.
template <int kVecs>
KVT_INLINE void dequantize_plane(const uint8_t* plane, const PlaneSide& side, ElemType type, int offset, int count,
                                 int head_size, int group_size, const ItemScratch& s, float* __restrict out) {
  switch (side.bits) {
    case 2: dequantize_tokens<2, kVecs>(plane, side, offset, count, head_size, group_size, s, out); return;
    case 4: dequantize_tokens<4, kVecs>(plane, side, offset, count, head_size, group_size, s, out); return;
    case 8: dequantize_tokens<8, kVecs>(plane, side, offset, count, head_size, group_size, s, out); return;
    default:  // 16 bits: the model dtype's bytes, token after token
      load_row(plane + side.codes_offset + int64_t(offset) * side.code_bytes, type, count * head_size, out);
      return;
  }
}

// ---------------------------------------------------------------------------------------
// Full-precision rows of the window: the ring before this step, the step's own rows after
// ---------------------------------------------------------------------------------------

struct FullRows {
  const char* fresh;      // the sequence's first row of this head (key or value)
  int64_t fresh_stride;   // bytes between rows
  const char* ring;       // this head's K or V rows [R][D] in the sequence's ring block
  int64_t ring_stride;    // bytes between ring rows
  int first_position, residual_length;

  const void* row(int position) const {
    if (position >= first_position) return fresh + int64_t(position - first_position) * fresh_stride;
    return ring + int64_t(position % residual_length) * ring_stride;
  }
};

KVT_INLINE Vec16 even_lanes(Vec16 a, Vec16 b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}

KVT_INLINE Vec16 odd_lanes(Vec16 a, Vec16 b) {
  return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// A row in channel order -> tile order for codes of kBits (< 8) bits: per full run, lane j of
// byte i (channel per_byte * i + j) goes to j * 16 + i, a deinterleave of the run's vectors.
template <int kBits>
KVT_INLINE void channels_to_tile(const float* __restrict row, int head_size, const int* order,
                                 float* __restrict tile) {
  constexpr int kRunChannels = kRunBytes * 8 / kBits;
  int base = 0;
  for (; base + kRunChannels <= head_size; base += kRunChannels) {
    const float* in = row + base;
    float* out = tile + base;
    if constexpr (kBits == 4) {
      const Vec16 a = load16(in), b = load16(in + kLanes);
      store16(out, even_lanes(a, b));
      store16(out + kLanes, odd_lanes(a, b));
    } else {
      const Vec16 a0 = load16(in), a1 = load16(in + kLanes), a2 = load16(in + 2 * kLanes), a3 = load16(in + 3 * kLanes);
      const Vec16 even_low = even_lanes(a0, a1), odd_low = odd_lanes(a0, a1);
      const Vec16 even_high = even_lanes(a2, a3), odd_high = odd_lanes(a2, a3);
      store16(out, even_lanes(even_low, even_high));            // channels 4i
      store16(out + kLanes, even_lanes(odd_low, odd_high));     // 4i + 1
      store16(out + 2 * kLanes, odd_lanes(even_low, even_high));  // 4i + 2
      store16(out + 3 * kLanes, odd_lanes(odd_low, odd_high));    // 4i + 3
    }
  }
  for (int c = base; c < head_size; ++c) tile[order[c]] = row[c];  // a short last run
}

// Positions [first, first + count) of the window -> fp32 [count][D] in the tile order of `bits`.
KVT_INLINE void load_full_rows(const FullRows& rows, ElemType type, int first, int count, int head_size, int bits,
                               const int* order, const ItemScratch& s, float* __restrict out) {
  for (int t = 0; t < count; ++t) {
    float* tile_row = out + int64_t(t) * head_size;
    if (bits >= 8) {
      load_row(rows.row(first + t), type, head_size, tile_row);
      continue;
    }
    load_row(rows.row(first + t), type, head_size, s.row);
    if (bits == 4) {
      channels_to_tile<4>(s.row, head_size, order, tile_row);
    } else {
      channels_to_tile<2>(s.row, head_size, order, tile_row);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Scores and the online softmax
// ---------------------------------------------------------------------------------------


// scores[j] = q . keys[j] for `count` tokens: sixteen tokens at a time into one vector of sums,
// then four at a time, for independent FMA chains and few horizontal reductions. Returns their
// maximum.
template <int kVecs>
KVT_INLINE float score_keys(const float* __restrict q, const float* __restrict keys, int count, int runtime_head_size,
                            float* __restrict scores) {
  const int vecs = KVT_VECS(kVecs, runtime_head_size), head_size = vecs * kLanes;
  Vec16 qv[kVecs > 0 ? kVecs : kMaxVecs];
  for (int k = 0; k < vecs; ++k) qv[k] = load16(q + k * kLanes);
  int j = 0;
  Vec16 max16 = broadcast(kNegInf);
  for (; j + kLanes <= count; j += kLanes) {
    Vec16 dots[kLanes];
    for (int t = 0; t < kLanes; ++t) {
      const float* key = keys + int64_t(j + t) * head_size;
      Vec16 a = qv[0] * load16(key);
      for (int k = 1; k < vecs; ++k) a += qv[k] * load16(key + k * kLanes);
      dots[t] = a;
    }
    const Vec16 sums = horizontal_sums16(dots);
    store16(scores + j, sums);
    max16 = sums > max16 ? sums : max16;
  }
  float max = horizontal_max(max16);
  for (; j + 4 <= count; j += 4) {
    const float* k0 = keys + int64_t(j) * head_size;
    Vec16 a0 = qv[0] * load16(k0), a1 = qv[0] * load16(k0 + head_size);
    Vec16 a2 = qv[0] * load16(k0 + 2 * head_size), a3 = qv[0] * load16(k0 + 3 * head_size);
    for (int k = 1; k < vecs; ++k) {
      const int d = k * kLanes;
      a0 += qv[k] * load16(k0 + d);
      a1 += qv[k] * load16(k0 + head_size + d);
      a2 += qv[k] * load16(k0 + 2 * head_size + d);
      a3 += qv[k] * load16(k0 + 3 * head_size + d);
    }
    const Vec4 sums = horizontal_sums(a0, a1, a2, a3);
    std::memcpy(scores + j, &sums, sizeof(sums));
    max = std::max(max, std::max(std::max(sums[0], sums[1]), std::max(sums[2], sums[3])));
  }
  for (; j < count; ++j) {
    const float* key = keys + int64_t(j) * head_size;
    Vec16 a = qv[0] * load16(key);
    for (int k = 1; k < vecs; ++k) a += qv[k] * load16(key + k * kLanes);
    scores[j] = horizontal_sum(a);
    max = std::max(max, scores[j]);
  }
  return max;
}

// acc = acc * correction + sum_j weights[j] * values[j], the accumulator held in registers of
// the ISA's width (NativeVec: GCC 12 keeps a loop-carried Vec16 wider than them in memory).
template <int kVecs>
KVT_INLINE void accumulate_values(const float* __restrict weights, int count, const float* __restrict values,
                                  int runtime_head_size, float correction, float* __restrict acc) {
  using Vec = NativeVec;
  constexpr int kWidth = sizeof(Vec) / sizeof(float);
  const int head_size = KVT_VECS(kVecs, runtime_head_size) * kLanes, vecs = head_size / kWidth;
  Vec av[(kVecs > 0 ? kVecs : kMaxVecs) * kLanes / kWidth];
  for (int k = 0; k < vecs; ++k) av[k] = load_vec<Vec>(acc + k * kWidth) * correction;
  for (int j = 0; j < count; ++j) {
    const float w = weights[j];
    const float* v = values + int64_t(j) * head_size;
    for (int k = 0; k < vecs; ++k) av[k] += w * load_vec<Vec>(v + k * kWidth);
  }
  for (int k = 0; k < vecs; ++k) std::memcpy(acc + k * kWidth, &av[k], sizeof(Vec));
}

KVT_INLINE float scores_max(const float* x, int n) {
  float m = kNegInf;
  int j = 0;
  if (n >= kLanes) {
    Vec16 v = load16(x);
    for (j = kLanes; j + kLanes <= n; j += kLanes) {
      const Vec16 next = load16(x + j);
      v = next > v ? next : v;
    }
    m = horizontal_max(v);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - m) in place; returns their sum.
KVT_INLINE float exp_shifted(float* __restrict x, int n, float m) {
  Vec16 sums = {};
  int j = 0;
  const Vec16 shift = broadcast(m);
  for (; j + kLanes <= n; j += kLanes) {
    const Vec16 e = exp_nonpositive(load16(x + j) - shift);
    store16(x + j, e);
    sums += e;
  }
  float sum = horizontal_sum(sums);
  for (; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - m);
    sum += x[j];
  }
  return sum;
}

// Online-softmax update of one row with the scores of `count` consecutive keys, their maximum given.
template <int kVecs>
KVT_INLINE void accumulate_row(float* __restrict scores, int count, float chunk_max, const float* __restrict values,
                               int head_size, float* __restrict acc, float* row_max, float* row_sum) {
  float correction = 1.0f;
  if (chunk_max > *row_max) {
    correction = *row_max == kNegInf ? 0.0f : exp_nonpositive(*row_max - chunk_max);
    *row_sum *= correction;
    *row_max = chunk_max;
  }
  *row_sum += exp_shifted(scores, count, *row_max);
  accumulate_values<kVecs>(scores, count, values, head_size, correction, acc);
}

// Every row's update with a chunk of keys at positions [first, first + count), the tiles given;
// row r sees positions [begin[r], end[r]) (begin null: from the start of the chunk).
template <int kVecs>
KVT_INLINE void attend_chunk(const AttentionParams& p, int rows, int first, int count, const int* begin,
                             const int* end, const ItemScratch& s) {
  const int head_size = p.head_size;
  for (int r = 0; r < rows; ++r) {
    const int from = begin ? std::max(first, begin[r]) : first;
    const int to = std::min(first + count, end[r]);
    if (from >= to) continue;
    float max = score_keys<kVecs>(s.query + int64_t(r) * head_size, s.keys + int64_t(from - first) * head_size,
                                  to - from, head_size, s.scores);
    if (p.softcap > 0.0f) {
      for (int j = 0; j < to - from; ++j) s.scores[j] = std::tanh(s.scores[j] * p.scale / p.softcap) * p.softcap;
      max = scores_max(s.scores, to - from);
    }
    accumulate_row<kVecs>(s.scores, to - from, max, s.values + int64_t(from - first) * head_size, head_size,
                          s.acc + int64_t(r) * head_size, &s.max[r], &s.sum[r]);
  }
}

// ---------------------------------------------------------------------------------------
// One work item
// ---------------------------------------------------------------------------------------

KVT_INLINE int max_of(const int* v, int n) {
  int m = v[0];
  for (int i = 1; i < n; ++i) m = std::max(m, v[i]);
  return m;
}

KVT_INLINE int min_of(const int* v, int n) {
  int m = v[0];
  for (int i = 1; i < n; ++i) m = std::min(m, v[i]);
  return m;
}

struct ItemContext {
  const AttentionParams& p;
  const WorkItem& item;
  SequenceRows seq;
  int heads_per_kv, rows, chunk;
  PlaneSide key_side, value_side;
};

// Requests bytes [0, bytes) from L2 (hint 2: not L1, which holds the tiles).
KVT_INLINE void prefetch_range(const uint8_t* p, int64_t bytes) {
  constexpr int kLine = 64;
  for (int64_t at = 0; at < bytes; at += kLine) __builtin_prefetch(p + at, 0, 2);
}

// Packed keys [item.key_begin, max_r packed_end[r]) in chunks that stay inside a block. A
// sequence's blocks lie anywhere in the cache, so the hardware prefetchers cannot guess the
// next one: each chunk requests the same tokens of the next block, spread over the block so
// that the requests never crowd out the chunk's own loads.
template <int kVecs>
KVT_INLINE void attend_packed(const ItemContext& c, const ItemScratch& s) {
  const AttentionParams& p = c.p;
  const int end = max_of(s.packed_end, c.rows);
  const int32_t* blocks = p.block_table + int64_t(c.item.seq) * p.block_table_stride;
  auto plane_of = [&](int block) {
    return p.cache + int64_t(blocks[block]) * p.cache_stride_block + c.item.kv_head * p.cache_stride_head;
  };
  for (int first = c.item.key_begin; first < end;) {
    const int block = first / p.block_size, offset = first % p.block_size;
    const int count = std::min({c.chunk, p.block_size - offset, end - first});
    const uint8_t* plane = plane_of(block);
    if ((block + 1) * p.block_size < end) {
      const uint8_t* next = plane_of(block + 1);
      for (const PlaneSide* side : {&c.key_side, &c.value_side}) {
        prefetch_range(next + side->codes_offset + offset * side->code_bytes, count * side->code_bytes);
        if (side->token_group == 0) {  // kivi key params: a few rows per block, left to demand loads
          prefetch_range(next + side->params_offset + offset * side->param_bytes, count * side->param_bytes);
        }
      }
    }
    dequantize_plane<kVecs>(plane, c.key_side, p.dtype, offset, count, p.head_size, p.format.group_size, s, s.keys);
    dequantize_plane<kVecs>(plane, c.value_side, p.dtype, offset, count, p.head_size, p.format.group_size, s,
                            s.values);
    attend_chunk<kVecs>(p, c.rows, first, count, nullptr, s.packed_end, s);
    first += count;
  }
}

// Where the item's window rows lie: its ring rows and the step's own rows, keys and values.
struct WindowRows {
  FullRows keys, values;
};

KVT_INLINE WindowRows window_rows(const ItemContext& c) {
  const AttentionParams& p = c.p;
  const int elem = elem_size(p.dtype);
  const int64_t row_bytes = int64_t(p.head_size) * elem;
  const char* ring = static_cast<const char*>(p.ring.ring) +
                     (int64_t(p.ring.block_ids[c.item.seq]) * p.ring.stride_block +
                      c.item.kv_head * p.ring.stride_head) * elem;
  const int window = p.format.residual_length;
  return {{static_cast<const char*>(p.key) +
               (c.seq.start * p.key_stride_token + c.item.kv_head * p.key_stride_head) * elem,
           p.key_stride_token * elem, ring, row_bytes, c.seq.first, window},
          {static_cast<const char*>(p.value) +
               (c.seq.start * p.value_stride_token + c.item.kv_head * p.value_stride_head) * elem,
           p.value_stride_token * elem, ring + window * row_bytes, row_bytes, c.seq.first, window}};
}

// Full-precision keys [min_r full_begin[r], max_r full_end[r]): the window.
template <int kVecs>
KVT_INLINE void attend_full(const ItemContext& c, const ItemScratch& s) {
  const AttentionParams& p = c.p;
  const int begin = min_of(s.full_begin, c.rows);
  const int end = max_of(s.full_end, c.rows);
  if (begin >= end) return;
  const auto [keys, values] = window_rows(c);
  for (int first = begin; first < end; first += c.chunk) {
    const int count = std::min(c.chunk, end - first);
    load_full_rows(keys, p.dtype, first, count, p.head_size, p.format.key_bits, s.key_order, s, s.keys);
    load_full_rows(values, p.dtype, first, count, p.head_size, p.format.value_bits, s.value_order, s, s.values);
    attend_chunk<kVecs>(p, c.rows, first, count, s.full_begin, s.full_end, s);
  }
}

// Row r is query token item.query_begin + r / heads_per_kv, head kv_head * heads_per_kv + r % heads_per_kv.
KVT_INLINE int64_t row_offset(const ItemContext& c, int r, int64_t stride_token, int64_t stride_head) {
  const int token = c.seq.start + c.item.query_begin + r / c.heads_per_kv;
  const int head = c.item.kv_head * c.heads_per_kv + r % c.heads_per_kv;
  return token * stride_token + head * stride_head;
}

// Each row's key ranges: packed [key_begin, packed_end), full precision [full_begin, full_end).
KVT_INLINE void prepare_ranges(const ItemContext& c, const ItemScratch& s) {
  const AttentionParams& p = c.p;
  for (int r = 0; r < c.rows; ++r) {
    const int position = c.seq.first + c.item.query_begin + r / c.heads_per_kv;
    const int w0 = window_start(position, p.block_size, p.format.residual_length);
    s.packed_end[r] = std::min(w0, c.item.key_end);
    s.full_begin[r] = std::max(w0, c.item.key_begin);
    s.full_end[r] = std::min(position + 1, c.item.key_end);
  }
}

// Query rows in the key tile order (scaled unless softcap needs the raw scores), each row's key
// ranges, and an empty online softmax.
KVT_INLINE void prepare_rows(const ItemContext& c, const ItemScratch& s) {
  const AttentionParams& p = c.p;
  const int elem = elem_size(p.dtype);
  const char* query = static_cast<const char*>(p.query);
  const float q_scale = p.softcap > 0.0f ? 1.0f : p.scale;
  prepare_ranges(c, s);
  for (int r = 0; r < c.rows; ++r) {
    load_row(query + row_offset(c, r, p.query_stride_token, p.query_stride_head) * elem, p.dtype, p.head_size, s.row);
    float* row = s.query + int64_t(r) * p.head_size;
    for (int ch = 0; ch < p.head_size; ++ch) row[s.key_order[ch]] = s.row[ch] * q_scale;
    s.max[r] = kNegInf;
    s.sum[r] = 0.0f;
  }
  std::memset(s.acc, 0, sizeof(float) * c.rows * p.head_size);
}

// Each row's accumulator back in channel order: normalized into out, or raw into its partial slot.
KVT_INLINE void finish_rows(const ItemContext& c, const ItemScratch& s, float* partial) {
  const AttentionParams& p = c.p;
  const int elem = elem_size(p.dtype);
  char* out = static_cast<char*>(p.out);
  for (int r = 0; r < c.rows; ++r) {
    const float* tile_acc = s.acc + int64_t(r) * p.head_size;
    for (int ch = 0; ch < p.head_size; ++ch) s.row[ch] = tile_acc[s.value_order[ch]];
    if (c.item.partial_offset >= 0) {
      float* slot = partial + (c.item.partial_offset + r) * int64_t(p.head_size + 2);
      slot[0] = s.max[r];
      slot[1] = s.sum[r];
      std::memcpy(slot + 2, s.row, sizeof(float) * p.head_size);
      continue;
    }
    const float inv_sum = s.sum[r] > 0.0f ? 1.0f / s.sum[r] : 0.0f;
    store_row(s.row, inv_sum, p.dtype, p.head_size,
              out + row_offset(c, r, p.out_stride_token, p.out_stride_head) * elem);
  }
}

template <int kVecs>
KVT_INLINE void attend_item(const ItemContext& c, const ItemScratch& s) {
  attend_packed<kVecs>(c, s);
  if (c.p.format.residual_length > 0) attend_full<kVecs>(c, s);
}

KVT_INLINE PlaneSide plane_side(const PlaneLayout& layout, const FormatArgs& f, bool key) {
  if (key) return {0, layout.key_params_offset, layout.key_code_bytes, layout.key_param_bytes, f.key_bits,
                   f.key_bits == kUnquantizedBits ? 0 : f.key_group_size};
  return {layout.value_codes_offset, layout.value_params_offset, layout.value_code_bytes, layout.value_param_bytes,
          f.value_bits, 0};
}

KVT_INLINE ItemContext item_context(const AttentionParams& p, const WorkItem& item) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const PlaneLayout layout(p.format, p.head_size, elem_size(p.dtype), p.block_size);
  return {p,
          item,
          sequence_rows(p.seqs, item.seq),
          heads_per_kv,
          item.query_count * heads_per_kv,
          chunk_tokens(p.head_size),
          plane_side(layout, p.format, true),
          plane_side(layout, p.format, false)};
}

// The item, start to end: query rows in, every key range attended, rows out.
KVT_INLINE void run_item(const AttentionParams& p, const WorkItem& item, const ItemScratch& s, float* partial) {
  const ItemContext c = item_context(p, item);
  prepare_rows(c, s);
  switch (p.head_size / kLanes) {
    case 4: attend_item<4>(c, s); break;
    case 5: attend_item<5>(c, s); break;
    case 6: attend_item<6>(c, s); break;
    case 8: attend_item<8>(c, s); break;
    case 16: attend_item<16>(c, s); break;
    default: attend_item<0>(c, s); break;
  }
  finish_rows(c, s, partial);
}

}  // namespace
}  // namespace kvtuner::cpu
