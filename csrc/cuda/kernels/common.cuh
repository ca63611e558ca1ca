// Device helpers shared by the CUDA kernels: model-dtype conversions, code unpacking,
// team (sub-warp) reductions, debug checks. Torch-free, so kernel files compile in seconds and
// the host emulator (tests/kernels/cuda_emulator, which defines KVTUNER_EMULATOR) builds them
// with g++ alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "kernel_params.h"

namespace kvtuner::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// Every head size and group size is a multiple of 8, so 8 channels per lane never straddle
// a group, and a lane's codes are whole bytes for every bit width.
constexpr int kChannelsPerLane = 8;

// ------------------------------------------------------------------------------------------
// Debug checks (KVTUNER_DEBUG_CHECKS=1 builds): the index checks the launchers cannot do
// without reading device data (slot ids, block ids, sequence lengths). A failed check prints
// what failed and traps, which fails the launch and every later CUDA call of the process.
// ------------------------------------------------------------------------------------------

#ifndef KVTUNER_DEBUG_CHECKS
#define KVTUNER_DEBUG_CHECKS 0
#endif

#ifndef KVTUNER_EMULATOR
static __device__ __noinline__ void device_check_failed(const char* what, long long value, const char* file,
                                                        int line) {
  printf("kvtuner debug check failed: %s (value %lld) at %s:%d\n", what, value, file, line);
  __trap();
}
#endif

#if KVTUNER_DEBUG_CHECKS
#define KVT_DEVICE_CHECK(cond, what, value)                                                              \
  do {                                                                                                   \
    if (!(cond)) ::kvtuner::cuda::device_check_failed(what, (long long)(value), __FILE__, __LINE__);     \
  } while (0)
#else
#define KVT_DEVICE_CHECK(cond, what, value) \
  do {                                      \
  } while (0)
#endif

// A kernel launch. The host emulator (tests/kernels/cuda_emulator) defines its own, so the
// launch code it runs is this code. `kernel` must be a name (no template argument list).
#ifndef KVT_LAUNCH
#define KVT_LAUNCH(kernel, grid, threads, shared_bytes, stream, ...) \
  kernel<<<grid, threads, shared_bytes, stream>>>(__VA_ARGS__)
#endif

// Shared memory of a block as one struct, sized at launch (dynamic: above the 48 KiB static limit).
template <typename S>
__device__ __forceinline__ S& dynamic_shared() {
#ifdef KVTUNER_EMULATOR
  static S storage;  // the emulator runs one block at a time
  return storage;
#else
  extern __shared__ __align__(16) unsigned char storage[];
  return *reinterpret_cast<S*>(storage);
#endif
}

__host__ __device__ constexpr int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Lanes that work on one head vector: one per 8 channels, padded to a power of two (head
// sizes 80 and 96 leave lanes idle) so a team never straddles a warp and xor shuffles with
// offsets below the team size stay inside it.
__host__ __device__ constexpr int team_size(int head_size) { return next_pow2(head_size / kChannelsPerLane); }

// ------------------------------------------------------------------------------------------
// Model dtype
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 8 consecutive model-dtype values as float (rows of key, value and ring: element alignment only).
template <typename T>
__device__ __forceinline__ void load_row8(const T* src, float (&x)[kChannelsPerLane]) {
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) x[c] = to_float(src[c]);
}

// 32-bit words holding 8 channels of the model dtype (the payload of a 16-bit plane).
template <typename T>
constexpr int kRawWords = kChannelsPerLane * int(sizeof(T)) / 4;

// Channel c of 8 raw model-dtype values stored little end first in `w`.
template <typename T>
__device__ __forceinline__ float raw_channel(const uint32_t (&w)[kRawWords<T>], int c) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w[c]);
  } else {
    const uint32_t word = w[c / 2];
    const uint16_t bits = c % 2 ? uint16_t(word >> 16) : uint16_t(word & 0xffffu);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(uint32_t(bits) << 16);
    } else {
      return __half2float(__ushort_as_half(bits));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Codes
// ------------------------------------------------------------------------------------------

// Exact int -> float for codes < 2^23 with an OR and a subtract instead of a conversion.
__device__ __forceinline__ float code_to_float(uint32_t code) {
  return __uint_as_float(0x4b000000u | code) - 8388608.0f;
}

// The 8 codes of one lane, unpacked from its kBits bytes (little end first). Only 4-byte
// alignment is guaranteed (all plane sections and per-token runs are multiples of 4 bytes;
// the launchers check the cache strides), so 8-bit codes take two word loads.
template <int kBits>
__device__ __forceinline__ void load_codes(const uint8_t* src, float (&code)[kChannelsPerLane]) {
  static_assert(kBits == 2 || kBits == 4 || kBits == 8, "packed widths only");
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  if constexpr (kBits == 8) {
    const uint32_t lo = reinterpret_cast<const uint32_t*>(src)[0];
    const uint32_t hi = reinterpret_cast<const uint32_t*>(src)[1];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      code[c] = code_to_float((lo >> (8 * c)) & kMask);
      code[c + 4] = code_to_float((hi >> (8 * c)) & kMask);
    }
  } else {
    const uint32_t w = kBits == 4 ? *reinterpret_cast<const uint32_t*>(src)
                                  : uint32_t(*reinterpret_cast<const uint16_t*>(src));
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) code[c] = code_to_float((w >> (kBits * c)) & kMask);
  }
}

// A group's fp16 (scale, zero) pair, stored as one 4-byte word.
__device__ __forceinline__ float2 load_scale_zero(const uint8_t* src) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(src);
  return make_float2(__half2float(__ushort_as_half(uint16_t(w & 0xffffu))),
                     __half2float(__ushort_as_half(uint16_t(w >> 16))));
}

// 8 raw model-dtype values of a 16-bit plane, as float.
template <typename T>
__device__ __forceinline__ void load_raw(const uint8_t* src, float (&x)[kChannelsPerLane]) {
  uint32_t w[kRawWords<T>];
  const uint32_t* words = reinterpret_cast<const uint32_t*>(src);
#pragma unroll
  for (int i = 0; i < kRawWords<T>; ++i) w[i] = words[i];
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) x[c] = raw_channel<T>(w, c);
}

// ------------------------------------------------------------------------------------------
// Sequences of a varlen batch
// ------------------------------------------------------------------------------------------

// The sequence that owns row `row` (query_start_loc is non-decreasing); -1 for padding rows
// past the last sequence.
__device__ __forceinline__ int sequence_of_row(const SequenceArgs& seqs, int64_t row) {
  if (seqs.num_seqs == 0 || row >= seqs.query_start_loc[seqs.num_seqs]) return -1;
  int lo = 0, hi = seqs.num_seqs - 1;  // the last sequence starting at or before row
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (seqs.query_start_loc[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// sequence_rows (kernel_params.h) with the debug checks of what the batch promises.
__device__ __forceinline__ SequenceRows checked_sequence_rows(const SequenceArgs& seqs, int seq) {
  const SequenceRows s = sequence_rows(seqs, seq);
  KVT_DEVICE_CHECK(s.rows >= 0, "query_start_loc must not decrease", s.rows);
  KVT_DEVICE_CHECK(s.first >= 0, "a sequence's query rows exceed its seq_len", seqs.seq_lens[seq]);
  return s;
}

// ------------------------------------------------------------------------------------------
// Reductions over `width` aligned consecutive lanes (a power of two <= 32); every lane of
// the warp must call them (full-mask shuffles).
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ float lanes_min(float v, int width) {
  for (int offset = 1; offset < width; offset <<= 1) v = fminf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float lanes_max(float v, int width) {
  for (int offset = 1; offset < width; offset <<= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float lanes_sum(float v, int width) {
  for (int offset = 1; offset < width; offset <<= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace kvtuner::cuda
