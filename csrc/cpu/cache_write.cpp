// Bodies of the cache writers declared in cache_write.h.
#include "cpu/cache_write.h"

#include <cmath>
#include <vector>

#include "cpu/common/simd_isa.h"

namespace kvtuner::cpu {
namespace {

KVT_INLINE void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// reference.quantize's scale and zero of a group with range [lo, hi], as stored (fp16 bits) and as
// used for the codes (their fp32 values; inv = 0 for a constant group, whose codes are all 0).
struct GroupScale {
  uint16_t scale_h, zero_h;
  float zero, inv;
};

template <int kBits>
KVT_INLINE GroupScale group_scale(float lo, float hi) {
  constexpr float kQMax = float((1 << kBits) - 1);
  GroupScale g;
  g.zero_h = float_to_half(std::min(std::max(lo, -kFp16Max), kFp16Max));
  g.scale_h = float_to_half(std::min((hi - lo) / kQMax, kFp16Max));
  g.zero = half_to_float(g.zero_h);
  const float scale = half_to_float(g.scale_h);
  g.inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  return g;
}

// reference.quantize's code of x: round half to even (the default rounding mode), clamped.
template <int kBits>
KVT_INLINE uint8_t code_of(float x, float zero, float inv) {
  constexpr float kQMax = float((1 << kBits) - 1);
  const float r = std::nearbyint((x - zero) * inv);
  return uint8_t(r < 0.0f ? 0.0f : (r > kQMax ? kQMax : r));
}

// n codes (< 2^kBits, n a multiple of the codes per byte) -> packed bytes, little end first.
template <int kBits>
KVT_INLINE void pack(const uint8_t* __restrict q, int n, uint8_t* __restrict out) {
  constexpr int kPerByte = 8 / kBits;
  for (int i = 0; i < n / kPerByte; ++i) {
    uint32_t byte = 0;
    for (int j = 0; j < kPerByte; ++j) byte |= uint32_t(q[i * kPerByte + j]) << (j * kBits);
    out[i] = uint8_t(byte);
  }
}

// One per-token group of G channels -> its codes and its (scale, zero) bytes.
template <int kBits>
KVT_INLINE void quantize_group(const float* __restrict x, int group_size, uint8_t* __restrict codes,
                               uint8_t* __restrict scale_zero) {
  // The range in one 16-float vector, then across its lanes: GCC leaves a scalar min/max
  // reduction scalar (it was two thirds of a prefill chunk's write). Every group size (32, 64,
  // 128, head size) is a multiple of 16, and min and max give the same result in any order.
  Vec16 lo16 = load16(x), hi16 = lo16;
  for (int i = 16; i < group_size; i += 16) {
    const Vec16 v = load16(x + i);
    lo16 = v < lo16 ? v : lo16;
    hi16 = v > hi16 ? v : hi16;
  }
  float lo = lo16[0], hi = hi16[0];
  for (int j = 1; j < 16; ++j) {
    lo = std::min(lo, lo16[j]);
    hi = std::max(hi, hi16[j]);
  }
  const GroupScale g = group_scale<kBits>(lo, hi);
  uint8_t q[256];  // group_size <= head_size <= 256 is checked by the launcher
#pragma omp simd
  for (int i = 0; i < group_size; ++i) q[i] = code_of<kBits>(x[i], g.zero, g.inv);
  pack<kBits>(q, group_size, codes);
  store_u16(scale_zero, g.scale_h);
  store_u16(scale_zero + 2, g.zero_h);
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

// A kivi key group x[G_t][D] (fp32) -> codes of its G_t rows and one (scale, zero) pair per
// channel, each channel quantized over the group's positions (reference.quantize_channels).
template <int kBits>
KVT_INLINE void quantize_channels(const float* __restrict x, int tokens, int head_size, uint8_t* __restrict codes,
                                  uint8_t* __restrict params, float* __restrict lo, float* __restrict hi,
                                  uint8_t* __restrict q) {
  std::memcpy(lo, x, sizeof(float) * head_size);
  std::memcpy(hi, x, sizeof(float) * head_size);
  for (int t = 1; t < tokens; ++t) {
    const float* row = x + int64_t(t) * head_size;
    for (int c = 0; c < head_size; ++c) {
      lo[c] = std::min(lo[c], row[c]);
      hi[c] = std::max(hi[c], row[c]);
    }
  }
  for (int c = 0; c < head_size; ++c) {
    const GroupScale g = group_scale<kBits>(lo[c], hi[c]);
    store_u16(params + c * kParamBytesPerGroup, g.scale_h);
    store_u16(params + c * kParamBytesPerGroup + 2, g.zero_h);
    lo[c] = g.zero;  // reused: the zero and inverse scale the codes need
    hi[c] = g.inv;
  }
  const int code_bytes = head_size * kBits / 8;
  for (int t = 0; t < tokens; ++t) {
    const float* row = x + int64_t(t) * head_size;
#pragma omp simd
    for (int c = 0; c < head_size; ++c) q[c] = code_of<kBits>(row[c], lo[c], hi[c]);
    pack<kBits>(q, head_size, codes + int64_t(t) * code_bytes);
  }
}

// The model-dtype key row of `position` for kivi: this step's rows or, before them, the ring.
struct KeyRows {
  const char* key;       // the sequence's first row of this head
  int64_t key_stride;    // bytes between rows
  const char* ring;      // K rows [R][D] of this head in the sequence's ring block (null: no ring)
  int64_t ring_stride;   // bytes between ring rows
  int first_position, residual_length;

  const void* row(int position) const {
    if (position >= first_position) return key + int64_t(position - first_position) * key_stride;
    return ring + int64_t(position % residual_length) * ring_stride;
  }
};

}  // namespace

KVT_HOT void write_tokens(const CacheWriteParams& p, int64_t begin, int64_t end) {
  const int elem = elem_size(p.dtype);
  const PlaneLayout layout(p.format, p.head_size, elem, p.block_size);
  const bool kivi_keys = p.format.key_group_size > 0 && p.format.key_bits != kUnquantizedBits;
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    const int64_t block = slot / p.block_size;
    const int64_t offset = slot % p.block_size;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      uint8_t* plane = p.cache + block * p.cache_stride_block + h * p.cache_stride_head;
      if (!kivi_keys) {
        encode_head(key + (t * p.key_stride_token + h * p.key_stride_head) * elem, p.dtype, p.format.key_bits,
                    p.head_size, p.format.group_size, plane + offset * layout.key_code_bytes,
                    plane + layout.key_params_offset + offset * layout.key_param_bytes);
      }
      encode_head(value + (t * p.value_stride_token + h * p.value_stride_head) * elem, p.dtype,
                  p.format.value_bits, p.head_size, p.format.group_size,
                  plane + layout.value_codes_offset + offset * layout.value_code_bytes,
                  plane + layout.value_params_offset + offset * layout.value_param_bytes);
    }
  }
}

KVT_HOT void write_kivi_groups(const CacheWriteParams& p, int seq, int kv_head) {
  const int elem = elem_size(p.dtype);
  const int group = p.format.key_group_size, head_size = p.head_size;
  const PlaneLayout layout(p.format, head_size, elem, p.block_size);
  const auto [start, rows, first] = sequence_rows(p.seqs, seq);
  const int64_t ring_offset = int64_t(p.ring.block_ids[seq]) * p.ring.stride_block + kv_head * p.ring.stride_head;
  const KeyRows source{static_cast<const char*>(p.key) + (start * p.key_stride_token + kv_head * p.key_stride_head) * elem,
                       p.key_stride_token * elem, static_cast<const char*>(p.ring.ring) + ring_offset * elem,
                       int64_t(head_size) * elem, first, p.format.residual_length};

  thread_local std::vector<float> x, lo, hi;
  thread_local std::vector<uint8_t> q;
  x.resize(size_t(group) * head_size);
  lo.resize(head_size);
  hi.resize(head_size);
  q.resize(head_size);
  // end: one past the last position of a group that this step's rows complete.
  for (int end = (first / group + 1) * group; end <= first + rows; end += group) {
    const int64_t slot = p.slot_mapping[start + end - 1 - first];
    if (slot < 0) continue;
    for (int t = 0; t < group; ++t) load_row(source.row(end - group + t), p.dtype, head_size, &x[size_t(t) * head_size]);
    const int64_t block = slot / p.block_size, last = slot % p.block_size;
    uint8_t* plane = p.cache + block * p.cache_stride_block + kv_head * p.cache_stride_head;
    uint8_t* codes = plane + (last - group + 1) * layout.key_code_bytes;
    uint8_t* params = plane + layout.key_params_offset + last / group * int64_t(kParamBytesPerGroup) * head_size;
    switch (p.format.key_bits) {
      case 2: quantize_channels<2>(x.data(), group, head_size, codes, params, lo.data(), hi.data(), q.data()); break;
      case 4: quantize_channels<4>(x.data(), group, head_size, codes, params, lo.data(), hi.data(), q.data()); break;
      default: quantize_channels<8>(x.data(), group, head_size, codes, params, lo.data(), hi.data(), q.data()); break;
    }
  }
}

void write_window_sequence(const WindowWriteParams& p, int seq) {
  const int elem = elem_size(p.dtype);
  const int window = p.residual_length;
  const auto [first_row, rows, first_position] = sequence_rows(p.seqs, seq);
  const int kept = std::min(rows, window);
  const size_t row_bytes = size_t(p.head_size) * elem;
  char* ring = static_cast<char*>(p.ring.ring) + int64_t(p.ring.block_ids[seq]) * p.ring.stride_block * elem;
  const char* key = static_cast<const char*>(p.key);
  const char* value = static_cast<const char*>(p.value);
  for (int h = 0; h < p.num_kv_heads; ++h) {
    char* plane = ring + int64_t(h) * p.ring.stride_head * elem;  // K rows [R][D], then V rows [R][D]
    for (int i = rows - kept; i < rows; ++i) {
      const int64_t ring_row = (first_position + i) % window;
      const int64_t t = first_row + i;
      std::memcpy(plane + ring_row * row_bytes, key + (t * p.key_stride_token + h * p.key_stride_head) * elem,
                  row_bytes);
      std::memcpy(plane + (window + ring_row) * row_bytes,
                  value + (t * p.value_stride_token + h * p.value_stride_head) * elem, row_bytes);
    }
  }
}

}  // namespace kvtuner::cpu
