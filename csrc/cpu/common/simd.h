// Vector building blocks of the CPU kernels (GCC/clang vector extensions), torch-free, and
// every standard header the kernels use: a translation unit compiled for one ISA
// (`#pragma GCC target`, see attention_kernel.h) includes this file before its pragma, so the
// standard library keeps the default target. simd_isa.h adds the loads and conversions that
// differ per ISA.
//
// A Vec16 is 16 floats: one AVX-512 register, two AVX2 or four SSE registers. KVT_HOT entry
// points are compiled once per x86-64 level (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA +
// F16C, baseline) and picked when the library loads, so the binary runs on any x86-64 CPU;
// the helpers are always_inline so that every clone gets its own vectorized copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/common/numeric.h"

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
// A splat written as a shuffle: GCC 12 builds Vec16{x, x, ...} lane by lane in larger
// functions, and Vec16{} + x must add +0.0 (which turns -0.0 into +0.0).
KVT_INLINE Vec16 broadcast(float x) {
  const Vec16 v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

KVT_INLINE Vec16 int_to_float(Int16 v) { return __builtin_convertvector(v, Vec16); }

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

// exp(x) for x <= 0 (softmax arguments), 16 lanes, branch-free; relative error ~2e-7 (Cephes
// expf polynomial after range reduction by ln 2); exactly 0 below -87 (and for -inf).
KVT_INLINE Vec16 exp_nonpositive(Vec16 x) {
  const Vec16 lowest = broadcast(-87.0f);
  const Vec16 clamped = x < lowest ? lowest : x;             // 2^n stays a normal float
  const Vec16 round_magic = broadcast(12582912.0f);          // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 n = (clamped * broadcast(1.44269504088896341f) + round_magic) - round_magic;
  const Vec16 r = (clamped - n * broadcast(0.693359375f)) - n * broadcast(-2.12194440e-4f);
  Vec16 p = broadcast(1.9875691500e-4f);
  p = p * r + broadcast(1.3981999507e-3f);
  p = p * r + broadcast(8.3334519073e-3f);
  p = p * r + broadcast(4.1665795894e-2f);
  p = p * r + broadcast(1.6666665459e-1f);
  p = p * r + broadcast(5.0000001201e-1f);
  const Vec16 e = p * r * r + r + broadcast(1.0f);
  const Vec16 result = e * (Vec16)((__builtin_convertvector(n, Int16) + 127) << 23);
  return x < lowest ? Vec16{} : result;
}

KVT_INLINE float exp_nonpositive(float x) { return exp_nonpositive(broadcast(x))[0]; }

KVT_INLINE float horizontal_max(Vec16 v) {
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec8 m8 = a > b ? a : b;
  const Vec4 c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const Vec4 m4 = c > d ? c : d;
  return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
}

// r[j] = horizontal sum of v[j] for 16 vectors: a transpose-and-add tree (15 adds, 30 shuffles).
KVT_INLINE Vec16 horizontal_sums16(const Vec16* v) {
  Vec16 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    w[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

}  // namespace kvtuner::cpu
