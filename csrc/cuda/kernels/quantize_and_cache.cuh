// quantize_and_cache: writes one step's key/value vectors into the packed pages
// (kvtuner_vllm/format.py `quantize_and_cache_ref`). Arithmetic follows format.py `quantize`
// exactly (the cache bytes must match the reference bit for bit): fp32 math, correctly rounded
// division and reciprocal (no fast-math approximations, no FMA contraction), fp16
// round-to-nearest-even for scale and zero, round-half-even for the codes.
//
// Two kernels, both with grids fixed by the row count (CUDA-graph safe):
// * per token (values, and keys of the per-token scheme): a team of team_size(D) lanes per
//   (row, KV head), 8 channels per lane; a group of G channels is G/8 consecutive lanes,
//   reduced with xor shuffles;
// * kivi key groups: a block per row; the rows that complete a group of G_t positions quantize
//   it, a thread per (KV head, 8 channels) over the group's positions, read from the step's
//   rows or, for positions of earlier steps, from the sequence's ring.
#pragma once

#include "cuda/kernels/api.h"
#include "cuda/kernels/common.cuh"

namespace kvtuner::cuda {

constexpr int kQuantizeThreads = 128;
constexpr int kKiviThreads = 128;

// Where one side (K or V) of one token lands inside a (block, head) plane.
struct SideDest {
  uint8_t* codes;   // this token's codes (or raw values)
  uint8_t* params;  // this token's (scale, zero) pairs
};

// format.py `quantize` for one group with range [lo, hi]: the fp16 scale and zero, and the codes.
struct GroupQuantizer {
  __half scale_h, zero_h;
  float zero, inv, qmax;

  __device__ __forceinline__ GroupQuantizer(float lo, float hi, int bits) {
    qmax = float((1 << bits) - 1);
    zero_h = __float2half_rn(fminf(fmaxf(lo, -kFp16Max), kFp16Max));
    scale_h = __float2half_rn(fminf(__fdiv_rn(__fsub_rn(hi, lo), qmax), kFp16Max));
    zero = __half2float(zero_h);
    const float scale = __half2float(scale_h);
    inv = scale > 0.0f ? __frcp_rn(scale) : 0.0f;  // constant group: every code 0
  }

  __device__ __forceinline__ uint32_t code(float x) const {
    const float r = rintf(__fmul_rn(__fsub_rn(x, zero), inv));  // round half to even
    return uint32_t(fminf(fmaxf(r, 0.0f), qmax));
  }

  // The (scale, zero) pair as stored: one little-endian 4-byte word.
  __device__ __forceinline__ uint32_t param_word() const {
    return uint32_t(__half_as_ushort(scale_h)) | (uint32_t(__half_as_ushort(zero_h)) << 16);
  }
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

__device__ __forceinline__ void store_codes_dispatch(int bits, const uint32_t (&q)[kChannelsPerLane],
                                                     uint8_t* dst) {
  if (bits == 2) {
    store_codes<2>(q, dst);
  } else if (bits == 4) {
    store_codes<4>(q, dst);
  } else {
    store_codes<8>(q, dst);
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

  const GroupQuantizer quantizer(lo, hi, bits);
  uint32_t q[kChannelsPerLane];
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) q[c] = quantizer.code(v[c]);
  store_codes_dispatch(bits, q, dest.codes + lane * bits);
  if (lane % group_lanes == 0) {
    *reinterpret_cast<uint32_t*>(dest.params + (lane / group_lanes) * kParamBytesPerGroup) = quantizer.param_word();
  }
}

__device__ __forceinline__ bool kivi_keys(const FormatArgs& f) {
  return f.key_group_size > 0 && f.key_bits != kUnquantizedBits;
}

__device__ __forceinline__ void check_slot(const CacheWriteLaunch& launch, int64_t slot) {
  KVT_DEVICE_CHECK(slot < launch.num_cache_blocks * launch.p.block_size, "slot id past the cache", slot);
  (void)launch;
  (void)slot;
}

// Values, and keys of the per-token scheme, of every row with a slot.
template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_tokens_kernel(const CacheWriteLaunch launch) {
  const CacheWriteParams& p = launch.p;
  const int team = team_size(p.head_size);
  const int lane = threadIdx.x % team;
  const int64_t item = (int64_t(blockIdx.x) * kQuantizeThreads + threadIdx.x) / team;  // (row, head)
  const int64_t token = item / p.num_kv_heads;
  const int head = int(item % p.num_kv_heads);
  // No early exit: idle lanes still take part in their warp's shuffles.
  const int64_t slot = token < p.num_tokens ? p.slot_mapping[token] : -1;
  if (slot >= 0) check_slot(launch, slot);
  const bool active = slot >= 0 && lane * kChannelsPerLane < p.head_size;

  const PlaneLayout layout(p.format, p.head_size, int(sizeof(T)), p.block_size);
  const int64_t block = slot >= 0 ? slot / p.block_size : 0;
  const int64_t offset = slot >= 0 ? slot % p.block_size : 0;
  uint8_t* plane = p.cache + block * p.cache_stride_block + head * p.cache_stride_head;
  const int group_lanes = p.format.group_size / kChannelsPerLane;
  const int64_t channel = int64_t(lane) * kChannelsPerLane;

  if (!kivi_keys(p.format)) {  // uniform
    const T* key = static_cast<const T*>(p.key) + token * p.key_stride_token + head * p.key_stride_head + channel;
    quantize_lane<T>(key, active, p.format.key_bits, group_lanes, lane,
                     {plane + offset * layout.key_code_bytes,
                      plane + layout.key_params_offset + offset * layout.key_param_bytes});
  }
  const T* value =
      static_cast<const T*>(p.value) + token * p.value_stride_token + head * p.value_stride_head + channel;
  quantize_lane<T>(value, active, p.format.value_bits, group_lanes, lane,
                   {plane + layout.value_codes_offset + offset * layout.value_code_bytes,
                    plane + layout.value_params_offset + offset * layout.value_param_bytes});
}

// Key position `pos` of sequence `seq` (one head, 8 channels from `channel`): a row of this
// step when pos >= first, else the ring row pos mod R (written by write_window in earlier steps).
template <typename T>
__device__ __forceinline__ const T* kivi_key_source(const CacheWriteParams& p, int seq, const SequenceRows& s,
                                                    int head, int pos, int channel) {
  if (pos >= s.first) {
    return static_cast<const T*>(p.key) + int64_t(s.start + pos - s.first) * p.key_stride_token +
           head * p.key_stride_head + channel;
  }
  const int64_t ring_block = p.ring.block_ids[seq];
  return static_cast<const T*>(p.ring.ring) + ring_block * p.ring.stride_block + head * p.ring.stride_head +
         int64_t(pos % p.format.residual_length) * p.head_size + channel;
}

// Kivi keys: the row whose position ends a group of G_t positions quantizes the group, each
// channel over the group's positions (format.py `_write_kivi_groups`).
template <typename T>
__global__ void __launch_bounds__(kKiviThreads) quantize_kivi_keys_kernel(const CacheWriteLaunch launch) {
  const CacheWriteParams& p = launch.p;
  const int64_t row = blockIdx.x;
  const int group = p.format.key_group_size;
  const int seq = sequence_of_row(p.seqs, row);
  if (seq < 0) return;
  const SequenceRows s = checked_sequence_rows(p.seqs, seq);
  const int end = s.first + int(row - s.start) + 1;  // one past the row's position
  if (end % group != 0) return;
  const int64_t slot = p.slot_mapping[row];
  if (slot < 0) return;
  check_slot(launch, slot);
  const int offset = int(slot % p.block_size);
  KVT_DEVICE_CHECK(offset % group == group - 1, "a slot's block offset must be its position mod block_size",
                   slot);
  const int64_t block = slot / p.block_size;
  if (end - group < s.first) {
    KVT_DEVICE_CHECK(p.ring.block_ids[seq] >= 0 && p.ring.block_ids[seq] < launch.num_ring_blocks,
                     "ring block id out of range", p.ring.block_ids[seq]);
  }

  const PlaneLayout layout(p.format, p.head_size, int(sizeof(T)), p.block_size);
  const int bits = p.format.key_bits;
  const int lanes = p.head_size / kChannelsPerLane;
  for (int item = threadIdx.x; item < p.num_kv_heads * lanes; item += kKiviThreads) {
    const int head = item / lanes;
    const int channel = (item % lanes) * kChannelsPerLane;
    float lo[kChannelsPerLane], hi[kChannelsPerLane];
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) {
      lo[c] = INFINITY;
      hi[c] = -INFINITY;
    }
    for (int pos = end - group; pos < end; ++pos) {
      float x[kChannelsPerLane];
      load_row8(kivi_key_source<T>(p, seq, s, head, pos, channel), x);
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) {
        lo[c] = fminf(lo[c], x[c]);
        hi[c] = fmaxf(hi[c], x[c]);
      }
    }
    uint8_t* plane = p.cache + block * p.cache_stride_block + head * p.cache_stride_head;
    uint8_t* params = plane + layout.key_params_offset +
                      int64_t(offset / group) * kParamBytesPerGroup * p.head_size + channel * kParamBytesPerGroup;
    const GroupQuantizer quantizer[kChannelsPerLane] = {
        {lo[0], hi[0], bits}, {lo[1], hi[1], bits}, {lo[2], hi[2], bits}, {lo[3], hi[3], bits},
        {lo[4], hi[4], bits}, {lo[5], hi[5], bits}, {lo[6], hi[6], bits}, {lo[7], hi[7], bits}};
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) {
      reinterpret_cast<uint32_t*>(params)[c] = quantizer[c].param_word();
    }
    for (int pos = end - group; pos < end; ++pos) {
      float x[kChannelsPerLane];
      load_row8(kivi_key_source<T>(p, seq, s, head, pos, channel), x);
      uint32_t q[kChannelsPerLane];
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) q[c] = quantizer[c].code(x[c]);
      const int64_t token_offset = offset - (end - 1 - pos);
      store_codes_dispatch(bits, q, plane + token_offset * layout.key_code_bytes + channel * bits / 8);
    }
  }
}

}  // namespace kvtuner::cuda
