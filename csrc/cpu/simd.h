// Vector building blocks of the CPU kernels (GCC/clang vector extensions), torch-free.
//
// A Vec16 is 16 floats: one AVX-512 register, two AVX2 or four SSE registers. The hot entry
// points that use these helpers are compiled once per x86-64 level (KVT_HOT: x86-64-v4 =
// AVX-512, x86-64-v3 = AVX2 + FMA + F16C, baseline) and picked when the library loads, so
// the binary runs on any x86-64 CPU; the helpers are always_inline so that every clone gets
// its own vectorized copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/numeric.h"

// Vec16 helpers are always inlined into the clones, so the vector ABI of the default target never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && !defined(__clang__)
#define KVT_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVT_HOT
#endif
#define KVT_INLINE __attribute__((always_inline)) inline

namespace kvtuner::cpu {

typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef int32_t Int16 __attribute__((vector_size(64)));
typedef uint32_t UInt16 __attribute__((vector_size(64)));
typedef uint16_t Short16 __attribute__((vector_size(32)));
typedef uint8_t Bytes16 __attribute__((vector_size(16)));
constexpr int kLanes = 16;

template <class V>
KVT_INLINE V load_vec(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

KVT_INLINE Vec16 load16(const float* p) { return load_vec<Vec16>(p); }
KVT_INLINE void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }
KVT_INLINE Vec16 broadcast(float x) { return Vec16{} + x; }

KVT_INLINE Vec16 int_to_float(Int16 v) { return __builtin_convertvector(v, Vec16); }
KVT_INLINE Int16 widen(Bytes16 v) { return __builtin_convertvector(v, Int16); }

// Exact fp16 -> fp32 of 16 values (the branch-free form of half_to_float, in vector lanes).
KVT_INLINE Vec16 halves_to_floats(Short16 halves) {
  const UInt16 h = __builtin_convertvector(halves, UInt16);
  const UInt16 sign = (h & 0x8000u) << 16;
  const UInt16 magnitude = h & 0x7fffu;
  const UInt16 normal = (magnitude << 13) + (uint32_t(127 - 15) << 23);
  const UInt16 special = (magnitude << 13) | 0x7f800000u;  // inf / nan
  const Vec16 subnormal = __builtin_convertvector(magnitude, Vec16) * 5.9604644775390625e-8f;  // * 2^-24
  UInt16 bits = magnitude >= 0x7c00u ? special : normal;
  bits = magnitude < 0x400u ? (UInt16)subnormal : bits;
  return (Vec16)(bits | sign);
}

KVT_INLINE Vec16 bf16_to_floats(Short16 values) {
  return (Vec16)(__builtin_convertvector(values, UInt16) << 16);
}

// fp32 copies of n fp16 values (n any), 16 at a time.
KVT_INLINE void halves_to_float_array(const uint8_t* src, int n, float* __restrict dst) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) store16(dst + i, halves_to_floats(load_vec<Short16>(src + 2 * i)));
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = half_to_float(h);
  }
}

// One row of n values of the model dtype -> fp32.
KVT_INLINE void load_row(const void* src, ElemType type, int n, float* __restrict dst) {
  const uint8_t* bytes = static_cast<const uint8_t*>(src);
  switch (type) {
    case ElemType::kFloat32:
      std::memcpy(dst, src, sizeof(float) * n);
      return;
    case ElemType::kBFloat16: {
      int i = 0;
      for (; i + kLanes <= n; i += kLanes) store16(dst + i, bf16_to_floats(load_vec<Short16>(bytes + 2 * i)));
      for (; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        dst[i] = bf16_to_float(v);
      }
      return;
    }
    case ElemType::kFloat16:
      halves_to_float_array(bytes, n, dst);
      return;
  }
}

// dst = src * multiplier in the model dtype (rounded to nearest even, as torch does).
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

// exp(x) for x <= 0 (softmax arguments), branch-free so loops of it vectorize; relative
// error ~2e-7 (Cephes expf polynomial after range reduction by ln 2).
KVT_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);                // 2^n stays a normal float
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

}  // namespace kvtuner::cpu
