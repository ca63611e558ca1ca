// Scalar conversions between the model dtypes and fp32 for the CPU kernels, torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "packed_format.h"

namespace kvtuner::cpu {

using ::kvtuner::ElemType;

inline int elem_size(ElemType type) { return type == ElemType::kFloat32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------
// Scalar conversions. fp16 rounding must match torch's `.to(torch.float16)` bit for bit
// (round to nearest even, subnormals kept), because the stored scale/zero feed the codes.
// ---------------------------------------------------------------------------------------

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; after F. Giesen's float_to_half_fast3_rtne.
inline uint16_t float_to_half(float value) {
  constexpr uint32_t kF32Infinity = 255u << 23;
  constexpr uint32_t kF16Overflow = (127u + 16u) << 23;  // 2^16: everything above rounds to inf
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t f = float_bits(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t half;
  if (f >= kF16Overflow) {
    half = f > kF32Infinity ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {
    // Below the smallest normal half: the fp32 add rounds the mantissa into place.
    half = uint16_t(float_bits(bits_float(f) + bits_float(kDenormMagic)) - kDenormMagic);
  } else {
    const uint32_t mantissa_odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu + mantissa_odd;
    half = uint16_t(f >> 13);
  }
  return uint16_t(half | (sign >> 16));
}

// Exact, branch-free so that loops over fp16 payloads vectorize.
inline float half_to_float(uint16_t half) {
  const uint32_t sign = uint32_t(half & 0x8000u) << 16;
  const uint32_t magnitude = half & 0x7fffu;
  const uint32_t normal = (magnitude << 13) + (uint32_t(127 - 15) << 23);
  const uint32_t special = (magnitude << 13) | 0x7f800000u;          // inf / nan
  const float subnormal = float(magnitude) * 5.9604644775390625e-8f;  // magnitude * 2^-24, exact
  uint32_t bits = magnitude >= 0x7c00u ? special : normal;
  bits = magnitude < 0x400u ? float_bits(subnormal) : bits;
  return bits_float(bits | sign);
}

inline float bf16_to_float(uint16_t value) { return bits_float(uint32_t(value) << 16); }

// Round to nearest even, NaN kept quiet: what torch's float -> bfloat16 does.
inline uint16_t float_to_bf16(float value) {
  const uint32_t u = float_bits(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace kvtuner::cpu
