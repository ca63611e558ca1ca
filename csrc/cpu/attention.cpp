// The vector kernel of paged_attention (attention.h): per work item, chunks of keys are turned
// into fp32 tiles (dequantized from the packed pages, or loaded from the ring and the step's own
// rows for the full-precision window) and every query row that sees part of a chunk updates its
// online softmax with it.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/simd.h"
#include "packed_format.h"

namespace kvtuner::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxHeadSize = 256;

// ---------------------------------------------------------------------------------------
// Tile order. An fp32 tile holds each run of 16 code bytes in *storage order* rather than
// channel order: lane j of every byte first (for 4 bits the 16 low nibbles, then the 16 high
// ones; for 2 bits four vectors of 2-bit lanes). Unpacking is then elementwise vector code with
// no shuffles. The query rows are permuted the same way (a dot product does not care about the
// order), the full-precision window rows are loaded into it, and the value accumulators are put
// back in channel order once per item. A run is 16 bytes = 16, 32 or 64 channels; a shorter
// last run (head sizes 80, 96) is laid out the same way with fewer bytes.
// ---------------------------------------------------------------------------------------

constexpr int kRunBytes = 16;

// Tile position of channel `c` for codes of `bits` bits (the identity for 8 and 16 bits).
int tile_position(int bits, int head_size, int c) {
  if (bits >= 8) return c;
  const int per_byte = 8 / bits, run_channels = kRunBytes * per_byte;
  const int base = c / run_channels * run_channels, w = c - base;
  const int run_bytes = std::min(run_channels, head_size - base) / per_byte;
  return base + (w % per_byte) * run_bytes + w / per_byte;
}

struct TileOrder {
  int position[kMaxHeadSize];
  bool identity;

  void init(int bits, int head_size) {
    identity = bits >= 8;
    for (int c = 0; c < head_size; ++c) position[c] = tile_position(bits, head_size, c);
  }
};

// ---------------------------------------------------------------------------------------
// Dequantizing packed tokens into a tile
// ---------------------------------------------------------------------------------------

// Lane j (bits j*kBits .. j*kBits + kBits - 1) of 16 code bytes, as floats.
template <int kBits>
KVT_INLINE Vec16 code_lane(Int16 bytes, int j) {
  if constexpr (kBits == 8) return int_to_float(bytes);
  return int_to_float((bytes >> (j * kBits)) & ((1 << kBits) - 1));
}

KVT_INLINE Bytes16 load_run(const uint8_t* codes, int run_bytes) {
  Bytes16 bytes = {};
  std::memcpy(&bytes, codes, run_bytes);
  return bytes;
}

// The short last run of a head (head sizes 80 and 96): one group, fewer bytes.
template <int kBits, class ScaleAt>
KVT_INLINE void dequantize_short_run(const uint8_t* __restrict codes, int base, int run_bytes, const ScaleAt& params,
                                     float* __restrict out) {
  const Int16 bytes = widen(load_run(codes + base * kBits / 8, run_bytes));
  for (int j = 0; j < 8 / kBits; ++j) {
    const int position = base + j * run_bytes;
    const Vec16 value = code_lane<kBits>(bytes, j) * params.scale(position, run_bytes) + params.zero(position, run_bytes);
    std::memcpy(out + position, &value, sizeof(float) * run_bytes);
  }
}

// Per-token groups: one (scale, zero) per G channels of the token, `sz` = [scale, zero] per group.
// A 2-bit run is 64 channels: with G = 32 its bytes 8..15 belong to the next group.
template <int kBits>
struct TokenGroupParams {
  const float* sz;
  int group_size;

  KVT_INLINE Vec16 run_param(int base, int which) const {
    const Vec16 first = broadcast(sz[2 * (base / group_size) + which]);
    if constexpr (kBits != 2) return first;
    const Int16 upper = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
    const Vec16 second = broadcast(sz[2 * ((base + kRunBytes * 2) / group_size) + which]);
    return upper ? second : first;
  }
  // Short runs lie in one group (position // G is that of its first channel).
  KVT_INLINE Vec16 scale(int position, int) const { return broadcast(sz[2 * (position / group_size)]); }
  KVT_INLINE Vec16 zero(int position, int) const { return broadcast(sz[2 * (position / group_size) + 1]); }
};

template <int kBits>
KVT_INLINE void dequantize_token(const uint8_t* __restrict codes, const TokenGroupParams<kBits>& params,
                                 int head_size, float* __restrict out) {
  constexpr int kPerByte = 8 / kBits, kRunChannels = kRunBytes * kPerByte;
  int base = 0;
  for (; base + kRunChannels <= head_size; base += kRunChannels) {
    const Int16 bytes = widen(load_vec<Bytes16>(codes + base / kPerByte));
    const Vec16 scale = params.run_param(base, 0), zero = params.run_param(base, 1);
    for (int j = 0; j < kPerByte; ++j) store16(out + base + j * kLanes, code_lane<kBits>(bytes, j) * scale + zero);
  }
  if (base < head_size) dequantize_short_run<kBits>(codes, base, (head_size - base) / kPerByte, params, out);
}

// Kivi keys: one (scale, zero) per channel for a token group, given in tile order.
struct ChannelParams {
  const float* scale_tile;
  const float* zero_tile;

  KVT_INLINE Vec16 scale(int position, int n) const { return partial_load(scale_tile + position, n); }
  KVT_INLINE Vec16 zero(int position, int n) const { return partial_load(zero_tile + position, n); }
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
    const Int16 bytes = widen(load_vec<Bytes16>(codes + base / kPerByte));
    for (int j = 0; j < kPerByte; ++j) {
      const int position = base + j * kLanes;
      store16(out + position,
              code_lane<kBits>(bytes, j) * load16(params.scale_tile + position) + load16(params.zero_tile + position));
    }
  }
  if (base < head_size) dequantize_short_run<kBits>(codes, base, (head_size - base) / kPerByte, params, out);
}

// Where K or V of a (block, head) plane lies, and how it is quantized.
struct PlaneSide {
  int64_t codes_offset, params_offset, code_bytes, param_bytes;
  int bits;
  int token_group;  // kivi keys: G_t (params per channel per token group); 0: per-token groups
};

// Per-thread working memory, reused across items.
struct Scratch {
  std::vector<float> query, acc, max, sum;        // per query row
  std::vector<int> packed_end, full_begin, full_end;  // per query row: its key ranges
  std::vector<float> keys, values, scores, params;  // per chunk
  float channel_scale[kMaxHeadSize], channel_zero[kMaxHeadSize];  // kivi params of one token group, tile order
  float row[2 * kMaxHeadSize];                                     // one row in channel order
  TileOrder key_order, value_order;

  void reserve(int rows, int chunk, int head_size) {
    for (auto* v : {&query, &acc}) v->resize(size_t(rows) * head_size);
    for (auto* v : {&max, &sum}) v->resize(rows);
    for (auto* v : {&packed_end, &full_begin, &full_end}) v->resize(rows);
    for (auto* v : {&keys, &values}) v->resize(size_t(chunk) * head_size);
    scores.resize(chunk);
    params.resize(size_t(chunk) * head_size / 16 * 2 + kLanes);  // G >= 32: <= D/16 halves per token
  }
};

// Kivi key params of token group `group` of a plane -> channel_scale/zero in tile order.
KVT_INLINE void load_channel_params(const uint8_t* plane, const PlaneSide& side, int group, int head_size,
                                    Scratch& s) {
  const uint8_t* params = plane + side.params_offset + int64_t(group) * kParamBytesPerGroup * head_size;
  halves_to_float_array(params, 2 * head_size, s.row);
  for (int c = 0; c < head_size; ++c) {
    s.channel_scale[s.key_order.position[c]] = s.row[2 * c];
    s.channel_zero[s.key_order.position[c]] = s.row[2 * c + 1];
  }
}

template <int kBits>
KVT_INLINE void dequantize_tokens(const uint8_t* plane, const PlaneSide& side, int offset, int count, int head_size,
                                  int group_size, Scratch& s, float* __restrict out) {
  const uint8_t* codes = plane + side.codes_offset + int64_t(offset) * side.code_bytes;
  if (side.token_group > 0) {
    for (int t = 0; t < count;) {
      const int group = (offset + t) / side.token_group;
      const int group_end = std::min(count, (group + 1) * side.token_group - offset);
      load_channel_params(plane, side, group, head_size, s);
      const ChannelParams params{s.channel_scale, s.channel_zero};
      for (; t < group_end; ++t) {
        dequantize_token_channels<kBits>(codes + t * side.code_bytes, params, head_size, out + int64_t(t) * head_size);
      }
    }
    return;
  }
  const int param_floats = int(side.param_bytes / 2);
  halves_to_float_array(plane + side.params_offset + int64_t(offset) * side.param_bytes, count * param_floats,
                        s.params.data());
  for (int t = 0; t < count; ++t) {
    const TokenGroupParams<kBits> params{s.params.data() + t * param_floats, group_size};
    dequantize_token<kBits>(codes + t * side.code_bytes, params, head_size, out + int64_t(t) * head_size);
  }
}

// Positions [offset, offset + count) of one side of a plane -> fp32 [count][D] in tile order.
KVT_INLINE void dequantize_plane(const uint8_t* plane, const PlaneSide& side, ElemType type, int offset, int count,
                                 int head_size, int group_size, Scratch& s, float* __restrict out) {
  switch (side.bits) {
    case 2: dequantize_tokens<2>(plane, side, offset, count, head_size, group_size, s, out); return;
    case 4: dequantize_tokens<4>(plane, side, offset, count, head_size, group_size, s, out); return;
    case 8: dequantize_tokens<8>(plane, side, offset, count, head_size, group_size, s, out); return;
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

KVT_INLINE void load_full_rows(const FullRows& rows, ElemType type, int first, int count, int head_size,
                               const TileOrder& order, Scratch& s, float* __restrict out) {
  for (int t = 0; t < count; ++t) {
    float* tile_row = out + int64_t(t) * head_size;
    if (order.identity) {
      load_row(rows.row(first + t), type, head_size, tile_row);
      continue;
    }
    load_row(rows.row(first + t), type, head_size, s.row);
    for (int c = 0; c < head_size; ++c) tile_row[order.position[c]] = s.row[c];
  }
}

// ---------------------------------------------------------------------------------------
// Scores and the online softmax
// ---------------------------------------------------------------------------------------

// The micro-kernels below are templated on kVecs = D / 16 so that a row of q or of the
// output accumulator lives in registers; kVecs = 0 is the generic version for other D.
#define KVT_VECS(kVecs, head_size) ((kVecs) > 0 ? (kVecs) : (head_size) / kLanes)
constexpr int kMaxVecs = kMaxHeadSize / kLanes;

// scores[j] = q . keys[j] for `count` tokens; four tokens at a time for independent FMA chains.
template <int kVecs>
KVT_INLINE void score_keys(const float* __restrict q, const float* __restrict keys, int count, int head_size,
                           float* __restrict scores) {
  const int vecs = KVT_VECS(kVecs, head_size);
  Vec16 qv[kVecs > 0 ? kVecs : kMaxVecs];
  for (int k = 0; k < vecs; ++k) qv[k] = load16(q + k * kLanes);
  int j = 0;
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
  }
  for (; j < count; ++j) {
    const float* key = keys + int64_t(j) * head_size;
    Vec16 a = qv[0] * load16(key);
    for (int k = 1; k < vecs; ++k) a += qv[k] * load16(key + k * kLanes);
    scores[j] = horizontal_sum(a);
  }
}

// acc = acc * correction + sum_j weights[j] * values[j], the accumulator held in registers.
template <int kVecs>
KVT_INLINE void accumulate_values(const float* __restrict weights, int count, const float* __restrict values,
                                  int head_size, float correction, float* __restrict acc) {
  const int vecs = KVT_VECS(kVecs, head_size);
  Vec16 av[kVecs > 0 ? kVecs : kMaxVecs];
  for (int k = 0; k < vecs; ++k) av[k] = load16(acc + k * kLanes) * correction;
  for (int j = 0; j < count; ++j) {
    const float w = weights[j];
    const float* v = values + int64_t(j) * head_size;
    for (int k = 0; k < vecs; ++k) av[k] += w * load16(v + k * kLanes);
  }
  for (int k = 0; k < vecs; ++k) store16(acc + k * kLanes, av[k]);
}

// Online-softmax update of one row with the scores of `count` consecutive keys.
template <int kVecs>
KVT_INLINE void accumulate_row(float* __restrict scores, int count, const float* __restrict values, int head_size,
                               float* __restrict acc, float* row_max, float* row_sum) {
  float chunk_max = kNegInf;
#pragma omp simd reduction(max : chunk_max)
  for (int j = 0; j < count; ++j) chunk_max = std::max(chunk_max, scores[j]);
  float correction = 1.0f;
  if (chunk_max > *row_max) {
    correction = *row_max == kNegInf ? 0.0f : exp_nonpositive(*row_max - chunk_max);
    *row_sum *= correction;
    *row_max = chunk_max;
  }
  const float m = *row_max;
  float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
  for (int j = 0; j < count; ++j) {
    scores[j] = exp_nonpositive(scores[j] - m);
    chunk_sum += scores[j];
  }
  *row_sum += chunk_sum;
  accumulate_values<kVecs>(scores, count, values, head_size, correction, acc);
}

// Every row's update with a chunk of keys at positions [first, first + count), the tiles given;
// row r sees positions [begin[r], end[r]) (begin null: from the start of the chunk).
template <int kVecs>
KVT_INLINE void attend_chunk(const AttentionParams& p, int rows, int first, int count, const int* begin,
                             const int* end, Scratch& s) {
  const int head_size = p.head_size;
  for (int r = 0; r < rows; ++r) {
    const int from = begin ? std::max(first, begin[r]) : first;
    const int to = std::min(first + count, end[r]);
    if (from >= to) continue;
    score_keys<kVecs>(s.query.data() + int64_t(r) * head_size, s.keys.data() + int64_t(from - first) * head_size,
                      to - from, head_size, s.scores.data());
    if (p.softcap > 0.0f) {
      for (int j = 0; j < to - from; ++j) s.scores[j] = std::tanh(s.scores[j] * p.scale / p.softcap) * p.softcap;
    }
    accumulate_row<kVecs>(s.scores.data(), to - from, s.values.data() + int64_t(from - first) * head_size,
                          head_size, s.acc.data() + int64_t(r) * head_size, &s.max[r], &s.sum[r]);
  }
}

// ---------------------------------------------------------------------------------------
// One work item
// ---------------------------------------------------------------------------------------

// Keys dequantized per step: a K and a V tile of chunk x D floats stay in L1.
int chunk_tokens(int head_size) { return std::clamp(2048 / head_size, 16, 64); }

constexpr int kMaxRowsPerItem = 32;  // query rows (tokens x heads of a GQA group) of a short-query item
constexpr int kMinPartitionTokens = 256;

struct ItemContext {
  const AttentionParams& p;
  const WorkItem& item;
  SequenceRows seq;
  int heads_per_kv, rows, chunk;
  PlaneSide key_side, value_side;
};

// Packed keys [item.key_begin, max_r packed_end[r]) in chunks that stay inside a block.
template <int kVecs>
KVT_INLINE void attend_packed(const ItemContext& c, Scratch& s) {
  const AttentionParams& p = c.p;
  const int end = *std::max_element(s.packed_end.begin(), s.packed_end.begin() + c.rows);
  const int32_t* blocks = p.block_table + int64_t(c.item.seq) * p.block_table_stride;
  for (int first = c.item.key_begin; first < end;) {
    const int offset = first % p.block_size;
    const int count = std::min({c.chunk, p.block_size - offset, end - first});
    const uint8_t* plane =
        p.cache + int64_t(blocks[first / p.block_size]) * p.cache_stride_block + c.item.kv_head * p.cache_stride_head;
    dequantize_plane(plane, c.key_side, p.dtype, offset, count, p.head_size, p.format.group_size, s, s.keys.data());
    dequantize_plane(plane, c.value_side, p.dtype, offset, count, p.head_size, p.format.group_size, s,
                     s.values.data());
    attend_chunk<kVecs>(p, c.rows, first, count, nullptr, s.packed_end.data(), s);
    first += count;
  }
}

// Full-precision keys [min_r full_begin[r], max_r full_end[r]): the window.
template <int kVecs>
KVT_INLINE void attend_full(const ItemContext& c, Scratch& s) {
  const AttentionParams& p = c.p;
  const int begin = *std::min_element(s.full_begin.begin(), s.full_begin.begin() + c.rows);
  const int end = *std::max_element(s.full_end.begin(), s.full_end.begin() + c.rows);
  if (begin >= end) return;
  const int elem = elem_size(p.dtype);
  const int64_t row_bytes = int64_t(p.head_size) * elem;
  const char* ring = static_cast<const char*>(p.ring.ring) +
                     (int64_t(p.ring.block_ids[c.item.seq]) * p.ring.stride_block +
                      c.item.kv_head * p.ring.stride_head) * elem;
  const int window = p.format.residual_length;
  const FullRows keys{static_cast<const char*>(p.key) +
                          (c.seq.first_row * p.key_stride_token + c.item.kv_head * p.key_stride_head) * elem,
                      p.key_stride_token * elem, ring, row_bytes, c.seq.first_position, window};
  const FullRows values{static_cast<const char*>(p.value) +
                            (c.seq.first_row * p.value_stride_token + c.item.kv_head * p.value_stride_head) * elem,
                        p.value_stride_token * elem, ring + window * row_bytes, row_bytes, c.seq.first_position,
                        window};
  for (int first = begin; first < end; first += c.chunk) {
    const int count = std::min(c.chunk, end - first);
    load_full_rows(keys, p.dtype, first, count, p.head_size, s.key_order, s, s.keys.data());
    load_full_rows(values, p.dtype, first, count, p.head_size, s.value_order, s, s.values.data());
    attend_chunk<kVecs>(p, c.rows, first, count, s.full_begin.data(), s.full_end.data(), s);
  }
}

// Row r is query token item.query_begin + r / heads_per_kv, head kv_head * heads_per_kv + r % heads_per_kv.
KVT_INLINE int64_t row_offset(const ItemContext& c, int r, int64_t stride_token, int64_t stride_head) {
  const int token = c.seq.first_row + c.item.query_begin + r / c.heads_per_kv;
  const int head = c.item.kv_head * c.heads_per_kv + r % c.heads_per_kv;
  return token * stride_token + head * stride_head;
}

// Query rows in the key tile order (scaled unless softcap needs the raw scores), and each row's
// key ranges: packed [key_begin, packed_end), full precision [full_begin, full_end).
KVT_INLINE void prepare_rows(const ItemContext& c, Scratch& s) {
  const AttentionParams& p = c.p;
  const int elem = elem_size(p.dtype);
  const char* query = static_cast<const char*>(p.query);
  const float q_scale = p.softcap > 0.0f ? 1.0f : p.scale;
  for (int r = 0; r < c.rows; ++r) {
    load_row(query + row_offset(c, r, p.query_stride_token, p.query_stride_head) * elem, p.dtype, p.head_size, s.row);
    float* row = s.query.data() + int64_t(r) * p.head_size;
    for (int ch = 0; ch < p.head_size; ++ch) row[s.key_order.position[ch]] = s.row[ch] * q_scale;
    const int position = c.seq.first_position + c.item.query_begin + r / c.heads_per_kv;
    const int w0 = window_start(position, p.block_size, p.format.residual_length);
    s.packed_end[r] = std::min(w0, c.item.key_end);
    s.full_begin[r] = std::max(w0, c.item.key_begin);
    s.full_end[r] = std::min(position + 1, c.item.key_end);
    s.max[r] = kNegInf;
    s.sum[r] = 0.0f;
  }
  std::fill(s.acc.begin(), s.acc.begin() + int64_t(c.rows) * p.head_size, 0.0f);
}

// Each row's accumulator back in channel order: normalized into out, or raw into its partial slot.
KVT_INLINE void finish_rows(const ItemContext& c, Scratch& s, float* partial) {
  const AttentionParams& p = c.p;
  const int elem = elem_size(p.dtype);
  char* out = static_cast<char*>(p.out);
  for (int r = 0; r < c.rows; ++r) {
    const float* tile_acc = s.acc.data() + int64_t(r) * p.head_size;
    for (int ch = 0; ch < p.head_size; ++ch) s.row[ch] = tile_acc[s.value_order.position[ch]];
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
KVT_INLINE void attend_item(const ItemContext& c, Scratch& s) {
  attend_packed<kVecs>(c, s);
  if (c.p.format.residual_length > 0) attend_full<kVecs>(c, s);
}

PlaneSide plane_side(const PlaneLayout& layout, const FormatArgs& f, bool key) {
  if (key) return {0, layout.key_params_offset, layout.key_code_bytes, layout.key_param_bytes, f.key_bits,
                   f.key_bits == kUnquantizedBits ? 0 : f.key_group_size};
  return {layout.value_codes_offset, layout.value_params_offset, layout.value_code_bytes, layout.value_param_bytes,
          f.value_bits, 0};
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Plan
// ---------------------------------------------------------------------------------------

AttentionPlan plan_attention(const AttentionParams& p, int num_threads) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  struct Tile {
    int seq, query_begin, query_count, key_end;
    int64_t cost;
    bool long_query;
  };
  std::vector<Tile> tiles;
  int64_t total_cost = 0;
  for (int seq = 0; seq < p.seqs.num_seqs; ++seq) {
    const SequenceRows rows = sequence_rows(p, seq);
    const bool long_query = rows.rows >= kLongQueryTokens;
    const int tile_tokens = long_query ? kLongQueryTileTokens : std::max(1, kMaxRowsPerItem / heads_per_kv);
    for (int q = 0; q < rows.rows; q += tile_tokens) {
      const int count = std::min(tile_tokens, rows.rows - q);
      const int key_end = rows.first_position + q + count;  // one past the tile's last position
      const int64_t cost = int64_t(count) * heads_per_kv * (key_end - count / 2) + 64;
      tiles.push_back({seq, q, count, key_end, cost, long_query});
      total_cost += cost * p.num_kv_heads;
    }
  }
  // Split a short-query tile's keys into partitions when it alone would hold up the other
  // threads (decode of a few long sequences): aim at >= 4 items per thread.
  const int64_t target_cost = std::max<int64_t>(1, total_cost / (4 * int64_t(num_threads)));
  AttentionPlan plan;
  for (const Tile& tile : tiles) {
    const int64_t wanted = (tile.cost + target_cost - 1) / target_cost;
    const int parts =
        tile.long_query ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(wanted, tile.key_end / kMinPartitionTokens)));
    const int part_keys = (tile.key_end + parts - 1) / parts;
    const int rows = tile.query_count * heads_per_kv;
    for (int kv_head = 0; kv_head < p.num_kv_heads; ++kv_head) {
      if (parts == 1) {
        plan.items.push_back(
            {tile.seq, kv_head, tile.query_begin, tile.query_count, 0, tile.key_end, -1, tile.cost, tile.long_query});
        continue;
      }
      plan.reductions.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, parts, plan.partial_rows});
      for (int part = 0; part < parts; ++part) {
        const int begin = part * part_keys;
        const int end = std::min(tile.key_end, begin + part_keys);
        plan.items.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, begin, end, plan.partial_rows,
                              int64_t(rows) * (end - begin) + 64, false});
        plan.partial_rows += rows;
      }
    }
  }
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return plan;
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

KVT_HOT void run_work_item(const AttentionParams& p, const WorkItem& item, float* partial) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const PlaneLayout layout(p.format, p.head_size, elem_size(p.dtype), p.block_size);
  const ItemContext c{p,
                      item,
                      sequence_rows(p, item.seq),
                      heads_per_kv,
                      item.query_count * heads_per_kv,
                      chunk_tokens(p.head_size),
                      plane_side(layout, p.format, true),
                      plane_side(layout, p.format, false)};
  thread_local Scratch s;
  s.reserve(c.rows, c.chunk, p.head_size);
  s.key_order.init(p.format.key_bits, p.head_size);
  s.value_order.init(p.format.value_bits, p.head_size);
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

KVT_HOT void reduce_partitions(const AttentionParams& p, const ReduceItem& item, const float* partial) {
  const int head_size = p.head_size;
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const int rows = item.query_count * heads_per_kv;
  const int elem = elem_size(p.dtype);
  const SequenceRows seq = sequence_rows(p, item.seq);
  const int64_t slot_floats = head_size + 2;
  char* out = static_cast<char*>(p.out);
  float merged[kMaxHeadSize];
  for (int r = 0; r < rows; ++r) {
    float global_max = kNegInf;
    for (int part = 0; part < item.num_partitions; ++part) {
      global_max = std::max(global_max, partial[(item.partial_offset + int64_t(part) * rows + r) * slot_floats]);
    }
    float total = 0.0f;
    std::fill(merged, merged + head_size, 0.0f);
    for (int part = 0; part < item.num_partitions; ++part) {
      const float* slot = partial + (item.partial_offset + int64_t(part) * rows + r) * slot_floats;
      if (slot[0] == kNegInf) continue;  // partition outside this row's keys
      const float weight = exp_nonpositive(slot[0] - global_max);
      total += weight * slot[1];
      for (int d = 0; d < head_size; ++d) merged[d] += weight * slot[2 + d];
    }
    const int token = seq.first_row + item.query_begin + r / heads_per_kv;
    const int head = item.kv_head * heads_per_kv + r % heads_per_kv;
    store_row(merged, total > 0.0f ? 1.0f / total : 0.0f, p.dtype, head_size,
              out + (token * p.out_stride_token + head * p.out_stride_head) * elem);
  }
}

}  // namespace kvtuner::cpu
