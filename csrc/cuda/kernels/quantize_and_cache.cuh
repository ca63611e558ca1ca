// quantize_and_cache: writes one step's key/value vectors into the packed pages.
// Arithmetic follows kvtuner_vllm/format.py `quantize` exactly (the cache bytes must match
// the reference bit for bit): fp32 math, correctly rounded division and reciprocal (no
// fast-math approximations, no FMA contraction), fp16 round-to-nearest-even for scale and
// zero, round-half-even for the codes.
//
// Thread mapping: a team of team_size(D) lanes per (token, KV head), 8 channels per lane;
// a group of G channels is G/8 consecutive lanes, reduced with xor shuffles.
#pragma once

#include "cuda/kernels/api.h"
#include "cuda/kernels/common.cuh"

namespace kvtuner::cuda {

constexpr int kQuantizeThreads = 128;

// Where one side (K or V) of one token lands inside a (block, head) plane.
struct SideDest {
  uint8_t* codes;   // this token's codes (or raw values)
  uint8_t* params;  // this token's (scale, zero) pairs
};

// Raw copy for 16 bits: the page stores the model dtype unchanged.
template <typename T>
__device__ __forceinline__ void store_raw(const T (&x)[kChannelsPerLane], uint8_t* dst) {
  uint32_t w[kRawWords<T>];
  memcpy(w, x, sizeof(x));
  uint32_t* words = reinterpret_cast<uint32_t*>(dst);
#pragma unroll
  for (int i = 0; i < kRawWords<T>; ++i) words[i] = w[i];
}

// Packs 8 codes little end first and stores the lane's kBits bytes.
template <int kBits>
__device__ __forceinline__ void store_codes(const uint32_t (&q)[kChannelsPerLane], uint8_t* dst) {
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) w[kBits * c / 32] |= q[c] << (kBits * c % 32);
  if constexpr (kBits == 2) {
    *reinterpret_cast<uint16_t*>(dst) = uint16_t(w[0]);
  } else if constexpr (kBits == 4) {
    *reinterpret_cast<uint32_t*>(dst) = w[0];
  } else {
    reinterpret_cast<uint32_t*>(dst)[0] = w[0];  // only 4-byte alignment is guaranteed
    reinterpret_cast<uint32_t*>(dst)[1] = w[1];
  }
}

// Quantizes one lane's 8 channels of one head vector. Every lane of the warp calls this
// (the group reduction shuffles); `active` lanes load and store.
template <typename T>
__device__ void quantize_lane(const T* src, bool active, int bits, int group_lanes, int lane, SideDest dest) {
  T x[kChannelsPerLane];
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) x[c] = active ? src[c] : from_float<T>(0.0f);

  if (bits == kUnquantizedBits) {  // warp-uniform
    if (active) store_raw<T>(x, dest.codes + lane * kChannelsPerLane * sizeof(T));
    return;
  }

  float v[kChannelsPerLane];
  float lo = INFINITY, hi = -INFINITY;  // identity for idle lanes
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) {
    v[c] = to_float(x[c]);
    if (active) {
      lo = fminf(lo, v[c]);
      hi = fmaxf(hi, v[c]);
    }
  }
  // A group is group_lanes aligned lanes; when that is not a power of two the group is the
  // whole head (G == D), and the padded team lanes hold the identity.
  const int width = next_pow2(group_lanes);
  lo = lanes_min(lo, width);
  hi = lanes_max(hi, width);
  if (!active) return;

  const float qmax = float((1 << bits) - 1);
  const __half zero_h = __float2half_rn(fminf(fmaxf(lo, -kFp16Max), kFp16Max));
  const __half scale_h = __float2half_rn(fminf(__fdiv_rn(__fsub_rn(hi, lo), qmax), kFp16Max));
  const float zero = __half2float(zero_h);
  const float scale = __half2float(scale_h);
  const float inv = scale > 0.0f ? __frcp_rn(scale) : 0.0f;  // constant group: every code 0

  uint32_t q[kChannelsPerLane];
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) {
    const float r = rintf(__fmul_rn(__fsub_rn(v[c], zero), inv));  // round half to even
    q[c] = uint32_t(fminf(fmaxf(r, 0.0f), qmax));
  }
  uint8_t* codes = dest.codes + lane * bits;
  if (bits == 2) {
    store_codes<2>(q, codes);
  } else if (bits == 4) {
    store_codes<4>(q, codes);
  } else {
    store_codes<8>(q, codes);
  }
  if (lane % group_lanes == 0) {
    const uint32_t pair = uint32_t(__half_as_ushort(scale_h)) | (uint32_t(__half_as_ushort(zero_h)) << 16);
    *reinterpret_cast<uint32_t*>(dest.params + (lane / group_lanes) * kParamBytesPerGroup) = pair;
  }
}

template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_and_cache_kernel(const QuantizeParams p) {
  const int team = team_size(p.head_size);
  const int lane = threadIdx.x % team;
  const int64_t item = (int64_t(blockIdx.x) * kQuantizeThreads + threadIdx.x) / team;  // (token, head)
  const int64_t token = item / p.num_kv_heads;
  const int head = int(item % p.num_kv_heads);
  // No early exit: idle lanes still take part in their warp's shuffles.
  const int64_t slot = token < p.num_tokens ? p.slot_mapping[token] : -1;
  const bool active = slot >= 0 && lane * kChannelsPerLane < p.head_size;

  const PlaneLayout layout(p.key_bits, p.value_bits, p.head_size, p.group_size, int(sizeof(T)), p.block_size);
  const int64_t block = slot >= 0 ? slot / p.block_size : 0;
  const int64_t offset = slot >= 0 ? slot % p.block_size : 0;
  uint8_t* plane = p.cache + block * p.cache_stride_block + head * p.cache_stride_head;
  const int group_lanes = p.group_size / kChannelsPerLane;
  const int64_t channel = int64_t(lane) * kChannelsPerLane;

  const T* key = static_cast<const T*>(p.key) + token * p.key_stride_token + head * p.key_stride_head + channel;
  quantize_lane<T>(key, active, p.key_bits, group_lanes, lane,
                   {plane + offset * layout.key_code_bytes,
                    plane + layout.key_params_offset + offset * layout.key_param_bytes});

  const T* value =
      static_cast<const T*>(p.value) + token * p.value_stride_token + head * p.value_stride_head + channel;
  quantize_lane<T>(value, active, p.value_bits, group_lanes, lane,
                   {plane + layout.value_codes_offset + offset * layout.value_code_bytes,
                    plane + layout.value_params_offset + offset * layout.value_param_bytes});
}

}  // namespace kvtuner::cuda
