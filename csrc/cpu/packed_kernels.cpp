// Bodies of the CPU kernels declared in packed_kernels.h (no torch headers).
//
// Vectorization: the hot entry points are compiled three times (x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2+FMA, baseline) and picked at load time, so the binary runs on any x86-64
// CPU. Their helpers are always_inline, so each clone gets its own vectorized copy.
#include "packed_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__) && !defined(__clang__)
#define KVT_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVT_HOT
#endif
#define KVT_INLINE __attribute__((always_inline)) inline

namespace kvtuner::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------
// Loading the model dtype into fp32 and storing it back
// ---------------------------------------------------------------------------------------

KVT_INLINE void load_row(const void* src, ElemType type, int n, float* __restrict dst) {
  switch (type) {
    case ElemType::kFloat32:
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    case ElemType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
    case ElemType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
      return;
    }
  }
}

KVT_INLINE void store_row(const float* __restrict src, float multiplier, ElemType type, int n, void* dst) {
  switch (type) {
    case ElemType::kFloat32: {
      float* d = static_cast<float*>(dst);
      for (int i = 0; i < n; ++i) d[i] = src[i] * multiplier;
      return;
    }
    case ElemType::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = float_to_bf16(src[i] * multiplier);
      return;
    }
    case ElemType::kFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = float_to_half(src[i] * multiplier);
      return;
    }
  }
}

KVT_INLINE uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

KVT_INLINE void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// ---------------------------------------------------------------------------------------
// Quantizer: format.quantize, operation for operation (fp32, fp16-rounded scale and zero,
// multiply by the reciprocal, round half to even, clamp).
// ---------------------------------------------------------------------------------------

template <int kBits>
KVT_INLINE void quantize_group(const float* __restrict x, int group_size, uint8_t* __restrict codes,
                               uint8_t* __restrict scale_zero) {
  constexpr float kQMax = float((1 << kBits) - 1);
  float lo = x[0], hi = x[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int i = 0; i < group_size; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const uint16_t zero_h = float_to_half(std::min(std::max(lo, -kFp16Max), kFp16Max));
  const uint16_t scale_h = float_to_half(std::min((hi - lo) / kQMax, kFp16Max));
  const float zero = half_to_float(zero_h);
  const float scale = half_to_float(scale_h);
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;  // constant group: every code is 0

  uint8_t q[256];  // group_size <= head_size <= 256 is checked by the launcher
  for (int i = 0; i < group_size; ++i) {
    const float r = std::nearbyint((x[i] - zero) * inv);
    q[i] = uint8_t(r < 0.0f ? 0.0f : (r > kQMax ? kQMax : r));
  }
  constexpr int kPerByte = 8 / kBits;
  for (int i = 0; i < group_size / kPerByte; ++i) {
    uint32_t byte = 0;
    for (int j = 0; j < kPerByte; ++j) byte |= uint32_t(q[i * kPerByte + j]) << (j * kBits);
    codes[i] = uint8_t(byte);
  }
  store_u16(scale_zero, scale_h);
  store_u16(scale_zero + 2, zero_h);
}

// One token-head vector in its source dtype -> its code and param bytes in the page.
KVT_INLINE void encode_head(const void* src, ElemType type, int bits, int head_size, int group_size,
                            uint8_t* __restrict codes, uint8_t* __restrict params) {
  if (bits == kUnquantizedBits) {
    std::memcpy(codes, src, size_t(head_size) * elem_size(type));
    return;
  }
  float x[256];
  load_row(src, type, head_size, x);
  const int group_code_bytes = group_size * bits / 8;
  for (int g = 0; g * group_size < head_size; ++g) {
    const float* xg = x + g * group_size;
    uint8_t* cg = codes + g * group_code_bytes;
    uint8_t* pg = params + g * kParamBytesPerGroup;
    switch (bits) {
      case 2: quantize_group<2>(xg, group_size, cg, pg); break;
      case 4: quantize_group<4>(xg, group_size, cg, pg); break;
      default: quantize_group<8>(xg, group_size, cg, pg); break;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Vector types (GCC/clang vector extensions): 16 floats are one AVX-512 register; the
// AVX2 and baseline clones split them into 2 or 4 registers.
// ---------------------------------------------------------------------------------------

typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef int32_t Int16 __attribute__((vector_size(64)));
typedef uint8_t Bytes16 __attribute__((vector_size(16)));
typedef uint8_t UnalignedBytes16 __attribute__((vector_size(16), aligned(1)));
constexpr int kLanes = 16;

KVT_INLINE Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

KVT_INLINE void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

KVT_INLINE Vec4 fold_to_4(Vec16 v) {
  const Vec8 half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
}

// The four horizontal sums of a0..a3, as one vector.
KVT_INLINE Vec4 horizontal_sums(Vec16 a0, Vec16 a1, Vec16 a2, Vec16 a3) {
  const Vec4 x0 = fold_to_4(a0), x1 = fold_to_4(a1), x2 = fold_to_4(a2), x3 = fold_to_4(a3);
  const Vec4 y0 = __builtin_shufflevector(x0, x1, 0, 4, 2, 6) + __builtin_shufflevector(x0, x1, 1, 5, 3, 7);
  const Vec4 y1 = __builtin_shufflevector(x2, x3, 0, 4, 2, 6) + __builtin_shufflevector(x2, x3, 1, 5, 3, 7);
  return __builtin_shufflevector(y0, y1, 0, 1, 4, 5) + __builtin_shufflevector(y0, y1, 2, 3, 6, 7);
}

KVT_INLINE float horizontal_sum(Vec16 v) {
  const Vec4 x = fold_to_4(v);
  return (x[0] + x[2]) + (x[1] + x[3]);
}

// ---------------------------------------------------------------------------------------
// Dequantizer: code and param bytes of consecutive tokens of one plane -> fp32 [n][D].
//
// The fp32 tile holds each run of 16 code bytes in *storage order* rather than channel
// order: lane j of every byte first (for 4 bits the 16 low nibbles, then the 16 high ones;
// for 2 bits four vectors of 2-bit lanes). Unpacking is then elementwise vector code with
// no shuffles. The query rows are permuted the same way (a dot product does not care
// about the order) and the value accumulators are put back in channel order once per work
// item. A run is 16, 32 or 64 channels; each half of it lies in one group (G >= 32), so
// the scale and zero vectors are [group of the first half] x 8, [group of the second] x 8.
// A shorter last run (head sizes like 80, 96) is laid out the same way with fewer bytes.
// ---------------------------------------------------------------------------------------

constexpr int kRunBytes = 16;
constexpr int kMaxGroups = 8;  // D <= 256, G >= 32

// Tile position of channel `c` for codes of `bits` bits.
KVT_INLINE int tile_position(int bits, int head_size, int c) {
  if (bits > 8) return c;
  const int per_byte = 8 / bits, run_channels = kRunBytes * per_byte;
  const int base = c / run_channels * run_channels, w = c - base;
  const int run_bytes = std::min(run_channels, head_size - base) / per_byte;
  return base + (w % per_byte) * run_bytes + w / per_byte;
}

// One token's scales and zeros as floats, converted once for all its runs.
struct TokenParams {
  float scale[kMaxGroups], zero[kMaxGroups];

  KVT_INLINE void load(const uint8_t* params, int num_groups) {
    for (int g = 0; g < num_groups; ++g) {
      scale[g] = half_to_float(load_u16(params + g * kParamBytesPerGroup));
      zero[g] = half_to_float(load_u16(params + g * kParamBytesPerGroup + 2));
    }
  }
};

template <int kBits>
KVT_INLINE void dequantize_full_run(const uint8_t* __restrict codes, const TokenParams& params, int base,
                                    int group_size, float* __restrict out) {
  constexpr int kPerByte = 8 / kBits;
  constexpr int kHalfChannels = kRunBytes * kPerByte / 2;
  const int g0 = base / group_size, g1 = (base + kHalfChannels) / group_size;
  Vec16 scale = Vec16{} + params.scale[g0], zero = Vec16{} + params.zero[g0];
  if constexpr (kBits == 2) {  // a 64-channel run spans two groups when G = 32
    for (int i = kLanes / 2; i < kLanes; ++i) {
      scale[i] = params.scale[g1];
      zero[i] = params.zero[g1];
    }
  }
  const Bytes16 bytes = *reinterpret_cast<const UnalignedBytes16*>(codes);  // one vector load
  for (int j = 0; j < kPerByte; ++j) {
    const Bytes16 lane = kBits == 8 ? bytes : Bytes16((bytes >> (j * kBits)) & uint8_t((1u << kBits) - 1));
    const Vec16 value = __builtin_convertvector(__builtin_convertvector(lane, Int16), Vec16);
    store16(out + j * kLanes, value * scale + zero);
  }
}

template <int kBits>
KVT_INLINE void dequantize_short_run(const uint8_t* __restrict codes, const TokenParams& params, int base,
                                     int run_bytes, int group_size, float* __restrict out) {
  constexpr int kPerByte = 8 / kBits;
  for (int j = 0; j < kPerByte; ++j) {
    for (int i = 0; i < run_bytes; ++i) {
      const int group = (base + i * kPerByte) / group_size;
      const float code = float((codes[i] >> (j * kBits)) & ((1u << kBits) - 1));
      out[j * run_bytes + i] = code * params.scale[group] + params.zero[group];
    }
  }
}

template <int kBits>
KVT_INLINE void dequantize_tokens(const uint8_t* codes, const uint8_t* params, int num_tokens, int head_size,
                                  int group_size, float* __restrict out) {
  constexpr int kPerByte = 8 / kBits;
  constexpr int kRunChannels = kRunBytes * kPerByte;
  const int code_bytes = head_size / kPerByte;
  const int param_bytes = head_size / group_size * kParamBytesPerGroup;
  for (int t = 0; t < num_tokens; ++t) {
    const uint8_t* token_codes = codes + int64_t(t) * code_bytes;
    float* token_out = out + int64_t(t) * head_size;
    TokenParams token_params;
    token_params.load(params + int64_t(t) * param_bytes, head_size / group_size);
    if constexpr (kBits == 8) {  // one code per byte: a plain loop per group vectorizes best
      for (int g = 0; g * group_size < head_size; ++g) {
        const float scale = token_params.scale[g], zero = token_params.zero[g];
        const uint8_t* group_codes = token_codes + g * group_size;
        float* group_out = token_out + g * group_size;
        for (int i = 0; i < group_size; ++i) group_out[i] = float(group_codes[i]) * scale + zero;
      }
      continue;
    }
    int base = 0;
    for (; base + kRunChannels <= head_size; base += kRunChannels) {
      dequantize_full_run<kBits>(token_codes + base / kPerByte, token_params, base, group_size, token_out + base);
    }
    if (base < head_size) {
      dequantize_short_run<kBits>(token_codes + base / kPerByte, token_params, base, (head_size - base) / kPerByte,
                                  group_size, token_out + base);
    }
  }
}

// Tokens [first, first + n) of one (block, head) plane, K or V half.
struct PlaneSide {
  int64_t codes_offset, params_offset, code_bytes, param_bytes;
  int bits;
};

KVT_INLINE void dequantize_plane(const uint8_t* plane, const PlaneSide& side, ElemType type, int first,
                                 int num_tokens, int head_size, int group_size, float* __restrict out) {
  const uint8_t* codes = plane + side.codes_offset + int64_t(first) * side.code_bytes;
  const uint8_t* params = plane + side.params_offset + int64_t(first) * side.param_bytes;
  switch (side.bits) {
    case 2: dequantize_tokens<2>(codes, params, num_tokens, head_size, group_size, out); return;
    case 4: dequantize_tokens<4>(codes, params, num_tokens, head_size, group_size, out); return;
    case 8: dequantize_tokens<8>(codes, params, num_tokens, head_size, group_size, out); return;
    default:
      load_row(codes, type, num_tokens * head_size, out);  // 16 bits: the dtype's bytes, token after token
      return;
  }
}

// ---------------------------------------------------------------------------------------
// Softmax helpers
// ---------------------------------------------------------------------------------------

// exp(x) for x <= 0 (softmax arguments), branch-free so loops of it vectorize; relative
// error ~2e-7 (Cephes expf polynomial after range reduction by ln 2).
KVT_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // 2^n stays a normal float
  const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRoundMagic) - kRoundMagic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * bits_float(uint32_t(int32_t(n) + 127) << 23);
}

// The micro-kernels below are templated on kVecs = D / 16 so that a row of q or of the
// output accumulator lives in registers; kVecs = 0 is the generic version for other D.
#define KVT_VECS(kVecs, head_size) ((kVecs) > 0 ? (kVecs) : (head_size) / kLanes)
constexpr int kMaxVecs = 16;  // D <= 256

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

// Per-thread working memory of one work item, reused across items.
struct Scratch {
  std::vector<float> query, acc, max, sum, keys, values, scores;
  std::vector<float> channel_row;  // one row in channel order (query in, output out)
  std::vector<int> row_begin, row_end;

  void reserve(int rows, int chunk, int head_size) {
    query.resize(size_t(rows) * head_size);
    acc.resize(size_t(rows) * head_size);
    max.resize(rows);
    sum.resize(rows);
    keys.resize(size_t(chunk) * head_size);
    values.resize(size_t(chunk) * head_size);
    scores.resize(chunk);
    channel_row.resize(head_size);
    row_begin.resize(rows);
    row_end.resize(rows);
  }
};

// Tokens dequantized per step: a K and a V tile of chunk x D floats stay in L1/L2.
int chunk_tokens(int head_size) { return std::max(16, 4096 / head_size); }

constexpr int kMaxRowsPerItem = 32;  // query rows (tokens x heads of a GQA group) per work item
constexpr int kMinPartitionTokens = 256;

int query_tile_tokens(const AttentionParams& p) {
  return std::max(1, kMaxRowsPerItem / (p.num_q_heads / p.num_kv_heads));
}

struct SeqGeometry {
  int query_len, seq_len;
  int64_t first_token;  // the sequence's first row in query/out
};

SeqGeometry seq_geometry(const AttentionParams& p, int seq) {
  return {p.seqs.query_start_loc[seq + 1] - p.seqs.query_start_loc[seq], p.seqs.seq_lens[seq], p.seqs.query_start_loc[seq]};
}

// Keys visible to the query at `position`: [begin, end).
KVT_INLINE void visible_keys(const AttentionParams& p, int position, int* begin, int* end) {
  (void)p;
  *begin = 0;
  *end = position + 1;
}

// Online-softmax update of one row with the scores of `count` consecutive keys.
template <int kVecs>
KVT_INLINE void accumulate_row(float* __restrict scores, int count, const float* __restrict values,
                               int head_size, float* __restrict acc, float* row_max, float* row_sum) {
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

// The key loop of a work item: dequantize each chunk of K and V once, then update every
// query row that sees part of it.
template <int kVecs>
KVT_INLINE void attend_chunks(const AttentionParams& p, const WorkItem& item, int rows, int chunk,
                              const PlaneSide& key_side, const PlaneSide& value_side, Scratch& s) {
  const int head_size = p.head_size;
  const int32_t* blocks = p.block_table + int64_t(item.seq) * p.block_table_stride;
  for (int first = item.key_begin; first < item.key_end;) {
    const int offset = first % p.block_size;
    const int count = std::min({chunk, p.block_size - offset, item.key_end - first});
    const uint8_t* plane =
        p.cache + int64_t(blocks[first / p.block_size]) * p.cache_stride_block + item.kv_head * p.cache_stride_head;
    dequantize_plane(plane, key_side, p.dtype, offset, count, head_size, p.format.group_size, s.keys.data());
    dequantize_plane(plane, value_side, p.dtype, offset, count, head_size, p.format.group_size, s.values.data());
    for (int r = 0; r < rows; ++r) {
      const int begin = std::max(first, s.row_begin[r]);
      const int end = std::min(first + count, s.row_end[r]);
      if (begin >= end) continue;
      score_keys<kVecs>(s.query.data() + int64_t(r) * head_size, s.keys.data() + int64_t(begin - first) * head_size,
                        end - begin, head_size, s.scores.data());
      if (p.softcap > 0.0f) {
        for (int j = 0; j < end - begin; ++j) s.scores[j] = std::tanh(s.scores[j] * p.scale / p.softcap) * p.softcap;
      }
      accumulate_row<kVecs>(s.scores.data(), end - begin, s.values.data() + int64_t(begin - first) * head_size,
                            head_size, s.acc.data() + int64_t(r) * head_size, &s.max[r], &s.sum[r]);
    }
    first += count;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

KVT_HOT void write_tokens(const CacheWriteParams& p, int64_t begin, int64_t end) {
  const int elem = elem_size(p.dtype);
  const PlaneLayout layout(p.format, p.head_size, elem, p.block_size);
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    const int64_t block = slot / p.block_size;
    const int64_t offset = slot % p.block_size;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      uint8_t* plane = p.cache + block * p.cache_stride_block + h * p.cache_stride_head;
      encode_head(key + (t * p.key_stride_token + h * p.key_stride_head) * elem, p.dtype, p.format.key_bits,
                  p.head_size, p.format.group_size, plane + offset * layout.key_code_bytes,
                  plane + layout.key_params_offset + offset * layout.key_param_bytes);
      encode_head(value + (t * p.value_stride_token + h * p.value_stride_head) * elem, p.dtype, p.format.value_bits,
                  p.head_size, p.format.group_size, plane + layout.value_codes_offset + offset * layout.value_code_bytes,
                  plane + layout.value_params_offset + offset * layout.value_param_bytes);
    }
  }
}

AttentionPlan plan_attention(const AttentionParams& p, int num_threads) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const int tile_tokens = query_tile_tokens(p);
  struct Tile {
    int seq, query_begin, query_count, key_begin, key_end;
    int64_t cost;
  };
  std::vector<Tile> tiles;
  int64_t total_cost = 0;
  for (int seq = 0; seq < p.seqs.num_seqs; ++seq) {
    const SeqGeometry g = seq_geometry(p, seq);
    for (int q = 0; q < g.query_len; q += tile_tokens) {
      const int count = std::min(tile_tokens, g.query_len - q);
      int key_begin, unused, key_end;
      visible_keys(p, g.seq_len - g.query_len + q, &key_begin, &unused);
      visible_keys(p, g.seq_len - g.query_len + q + count - 1, &unused, &key_end);
      const int64_t cost = int64_t(count) * heads_per_kv * (key_end - key_begin) + 64;
      tiles.push_back({seq, q, count, key_begin, key_end, cost});
      total_cost += cost * p.num_kv_heads;
    }
  }
  // Split a tile's keys into partitions when it alone would hold up the other threads
  // (decode of a few long sequences): aim at >= 4 items per thread.
  const int64_t target_cost = std::max<int64_t>(1, total_cost / (4 * int64_t(num_threads)));
  AttentionPlan plan;
  for (const Tile& tile : tiles) {
    const int keys = tile.key_end - tile.key_begin;
    const int64_t wanted = (tile.cost + target_cost - 1) / target_cost;
    const int parts = int(std::max<int64_t>(1, std::min<int64_t>(wanted, keys / kMinPartitionTokens)));
    const int part_keys = (keys + parts - 1) / parts;
    const int rows = tile.query_count * heads_per_kv;
    for (int kv_head = 0; kv_head < p.num_kv_heads; ++kv_head) {
      if (parts == 1) {
        plan.items.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, tile.key_begin, tile.key_end,
                              -1, tile.cost});
        continue;
      }
      plan.reductions.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, parts, plan.partial_rows});
      for (int part = 0; part < parts; ++part) {
        const int begin = tile.key_begin + part * part_keys;
        const int end = std::min(tile.key_end, begin + part_keys);
        plan.items.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, begin, end,
                              plan.partial_rows, int64_t(rows) * (end - begin) + 64});
        plan.partial_rows += rows;
      }
    }
  }
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return plan;
}

KVT_HOT void run_work_item(const AttentionParams& p, const WorkItem& item, float* partial) {
  const int head_size = p.head_size;
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const int rows = item.query_count * heads_per_kv;
  const int chunk = chunk_tokens(head_size);
  const int elem = elem_size(p.dtype);
  const SeqGeometry geo = seq_geometry(p, item.seq);
  const PlaneLayout layout(p.format, head_size, elem, p.block_size);
  const PlaneSide key_side{0, layout.key_params_offset, layout.key_code_bytes, layout.key_param_bytes, p.format.key_bits};
  const PlaneSide value_side{layout.value_codes_offset, layout.value_params_offset, layout.value_code_bytes,
                             layout.value_param_bytes, p.format.value_bits};

  thread_local Scratch s;
  s.reserve(rows, chunk, head_size);

  // Row r is query token item.query_begin + r / heads_per_kv, head kv_head * heads_per_kv + r % heads_per_kv.
  const char* query = static_cast<const char*>(p.query);
  for (int r = 0; r < rows; ++r) {
    const int q = item.query_begin + r / heads_per_kv;
    const int head = item.kv_head * heads_per_kv + r % heads_per_kv;
    float* row = s.query.data() + int64_t(r) * head_size;
    load_row(query + ((geo.first_token + q) * p.query_stride_token + head * p.query_stride_head) * elem, p.dtype,
             head_size, s.channel_row.data());
    const float q_scale = p.softcap > 0.0f ? 1.0f : p.scale;  // without softcap, fold the scale into q once
    for (int c = 0; c < head_size; ++c) row[tile_position(p.format.key_bits, head_size, c)] = s.channel_row[c] * q_scale;
    int begin, end;
    visible_keys(p, geo.seq_len - geo.query_len + q, &begin, &end);
    s.row_begin[r] = std::max(begin, item.key_begin);
    s.row_end[r] = std::min(end, item.key_end);
    s.max[r] = kNegInf;
    s.sum[r] = 0.0f;
  }
  std::fill(s.acc.begin(), s.acc.begin() + int64_t(rows) * head_size, 0.0f);

  switch (head_size / kLanes) {
    case 4: attend_chunks<4>(p, item, rows, chunk, key_side, value_side, s); break;
    case 5: attend_chunks<5>(p, item, rows, chunk, key_side, value_side, s); break;
    case 6: attend_chunks<6>(p, item, rows, chunk, key_side, value_side, s); break;
    case 8: attend_chunks<8>(p, item, rows, chunk, key_side, value_side, s); break;
    case 16: attend_chunks<16>(p, item, rows, chunk, key_side, value_side, s); break;
    default: attend_chunks<0>(p, item, rows, chunk, key_side, value_side, s); break;
  }

  char* out = static_cast<char*>(p.out);
  for (int r = 0; r < rows; ++r) {
    const float* tile_acc = s.acc.data() + int64_t(r) * head_size;
    float* acc = s.channel_row.data();
    for (int c = 0; c < head_size; ++c) acc[c] = tile_acc[tile_position(p.format.value_bits, head_size, c)];
    if (item.partial_offset >= 0) {
      float* slot = partial + (item.partial_offset + r) * int64_t(head_size + 2);
      slot[0] = s.max[r];
      slot[1] = s.sum[r];
      std::memcpy(slot + 2, acc, sizeof(float) * head_size);
      continue;
    }
    const int q = item.query_begin + r / heads_per_kv;
    const int head = item.kv_head * heads_per_kv + r % heads_per_kv;
    const float inv_sum = s.sum[r] > 0.0f ? 1.0f / s.sum[r] : 0.0f;  // no visible key: zeros
    store_row(acc, inv_sum, p.dtype, head_size,
              out + ((geo.first_token + q) * p.out_stride_token + head * p.out_stride_head) * elem);
  }
}

KVT_HOT void reduce_partitions(const AttentionParams& p, const ReduceItem& item, const float* partial) {
  const int head_size = p.head_size;
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const int rows = item.query_count * heads_per_kv;
  const int elem = elem_size(p.dtype);
  const SeqGeometry geo = seq_geometry(p, item.seq);
  const int64_t slot_floats = head_size + 2;
  char* out = static_cast<char*>(p.out);
  float merged[256];
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
    const int q = item.query_begin + r / heads_per_kv;
    const int head = item.kv_head * heads_per_kv + r % heads_per_kv;
    store_row(merged, total > 0.0f ? 1.0f / total : 0.0f, p.dtype, head_size,
              out + ((geo.first_token + q) * p.out_stride_token + head * p.out_stride_head) * elem);
  }
}

void write_window_sequence(const WindowWriteParams& p, int seq) {
  const int elem = elem_size(p.dtype);
  const int r = p.residual_length;
  const int first_row = p.seqs.query_start_loc[seq];
  const int rows = p.seqs.query_start_loc[seq + 1] - first_row;
  const int first_position = p.seqs.seq_lens[seq] - rows;
  const int kept = std::min(rows, r);
  char* ring = static_cast<char*>(p.ring.ring) + int64_t(p.ring.block_ids[seq]) * p.ring.stride_block * elem;
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  const size_t row_bytes = size_t(p.head_size) * elem;
  for (int h = 0; h < p.num_kv_heads; ++h) {
    char* plane = ring + int64_t(h) * p.ring.stride_head * elem;
    for (int i = rows - kept; i < rows; ++i) {
      const int64_t ring_row = (first_position + i) % r;
      const int64_t t = first_row + i;
      std::memcpy(plane + ring_row * row_bytes, key + (t * p.key_stride_token + h * p.key_stride_head) * elem,
                  row_bytes);
      std::memcpy(plane + (r + ring_row) * row_bytes,
                  value + (t * p.value_stride_token + h * p.value_stride_head) * elem, row_bytes);
    }
  }
}

}  // namespace kvtuner::cpu
