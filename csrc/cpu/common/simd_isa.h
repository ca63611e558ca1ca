// The loads and conversions that the vector extensions compile poorly: AVX-512 intrinsics in a
// translation unit that defines KVT_ISA_AVX512 after its `#pragma GCC target` (GCC 12 turns a
// byte -> int32 __builtin_convertvector into lane-by-lane scalar code, and has no vector
// fp16 conversion), portable vector code everywhere else. Internal linkage: every translation
// unit gets the copy of its own ISA.
#pragma once

#include "cpu/common/simd.h"

#ifndef KVT_ISA_AVX512
#define KVT_ISA_AVX512 0
#endif
#ifndef KVT_ISA_AVX2
#define KVT_ISA_AVX2 0
#endif

namespace kvtuner::cpu {
namespace {

// The float vector of the ISA's register width, for loop-carried values.
#if KVT_ISA_AVX512
using NativeVec = Vec16;
#elif KVT_ISA_AVX2
using NativeVec = Vec8;
#else
using NativeVec = Vec4;
#endif

#if KVT_ISA_AVX512
// The AVX-512 conversions below are the zero-masking forms with every lane kept: GCC compiles
// them to the plain instructions, while the plain intrinsics start from _mm512_undefined_*(),
// which GCC 12 reports as maybe uninitialized once inlined (GCC bug 105593).
constexpr __mmask16 kAllLanes = 0xffff;
#endif

typedef uint8_t UnalignedBytes16 __attribute__((vector_size(16), aligned(1), may_alias));
typedef uint16_t UnalignedShort16 __attribute__((vector_size(32), aligned(1), may_alias));

// 16 bytes -> 16 zero-extended int32 lanes.
KVT_INLINE Int16 widen_bytes(const uint8_t* p) {
#if KVT_ISA_AVX512
  return (Int16)_mm512_maskz_cvtepu8_epi32(kAllLanes, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  const Bytes16 bytes = *reinterpret_cast<const UnalignedBytes16*>(p);
  return __builtin_convertvector(__builtin_convertvector(bytes, Short16), Int16);  // two steps vectorize
#endif
}

// 16 fp16 values -> fp32 (exact).
KVT_INLINE Vec16 halves_to_floats(const uint8_t* p) {
#if KVT_ISA_AVX512
  return (Vec16)_mm512_maskz_cvtph_ps(kAllLanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  const UInt16 h = __builtin_convertvector(*reinterpret_cast<const UnalignedShort16*>(p), UInt16);
  const UInt16 sign = (h & 0x8000u) << 16;
  const UInt16 magnitude = h & 0x7fffu;
  const UInt16 normal = (magnitude << 13) + (uint32_t(127 - 15) << 23);
  const UInt16 special = (magnitude << 13) | 0x7f800000u;  // inf / nan
  const Vec16 subnormal = __builtin_convertvector(magnitude, Vec16) * 5.9604644775390625e-8f;  // * 2^-24
  UInt16 bits = magnitude >= 0x7c00u ? special : normal;
  bits = magnitude < 0x400u ? (UInt16)subnormal : bits;
  return (Vec16)(bits | sign);
#endif
}

// 16 bf16 values -> fp32 (exact).
KVT_INLINE Vec16 bf16_to_floats(const uint8_t* p) {
#if KVT_ISA_AVX512
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(kAllLanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (Vec16)_mm512_maskz_slli_epi32(kAllLanes, wide, 16);
#else
  return (Vec16)(__builtin_convertvector(*reinterpret_cast<const UnalignedShort16*>(p), UInt16) << 16);
#endif
}

// fp32 copies of n fp16 values (n any), 16 at a time.
KVT_INLINE void halves_to_float_array(const uint8_t* src, int n, float* __restrict dst) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) store16(dst + i, halves_to_floats(src + 2 * i));
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
      for (; i + kLanes <= n; i += kLanes) store16(dst + i, bf16_to_floats(bytes + 2 * i));
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

}  // namespace
}  // namespace kvtuner::cpu
