// write_window: after a step's attention, the last min(R, rows) rows of each sequence go to its
// ring block at row position mod R (kvtuner_vllm/format.py `write_window_ref`). A block per
// row (grid fixed by the row count: CUDA-graph safe), a thread per (KV head, 8 channels).
#pragma once

#include "cuda/kernels/api.h"
#include "cuda/kernels/common.cuh"

namespace kvtuner::cuda {

constexpr int kWindowThreads = 128;

template <typename T>
__device__ __forceinline__ void copy8(const T* src, T* dst) {
#pragma unroll
  for (int c = 0; c < kChannelsPerLane; ++c) dst[c] = src[c];
}

template <typename T>
__global__ void __launch_bounds__(kWindowThreads) write_window_kernel(const WindowWriteLaunch launch) {
  const WindowWriteParams& p = launch.p;
  const int64_t row = blockIdx.x;
  const int seq = sequence_of_row(p.seqs, row);
  if (seq < 0) return;
  const SequenceRows s = checked_sequence_rows(p.seqs, seq);
  const int index = int(row - s.start);  // the row's index in its sequence
  if (index < s.rows - p.residual_length) return;  // a later row of the step takes its ring row
  const int64_t ring_block = p.ring.block_ids[seq];
  KVT_DEVICE_CHECK(ring_block >= 0 && ring_block < launch.num_ring_blocks, "ring block id out of range", ring_block);
  const int64_t ring_row = (s.first + index) % p.residual_length;

  const int lanes = p.head_size / kChannelsPerLane;
  for (int item = threadIdx.x; item < p.num_kv_heads * lanes; item += kWindowThreads) {
    const int head = item / lanes;
    const int channel = (item % lanes) * kChannelsPerLane;
    T* plane = static_cast<T*>(p.ring.ring) + ring_block * p.ring.stride_block + head * p.ring.stride_head;
    const int64_t value_rows = int64_t(p.residual_length) * p.head_size;  // V rows follow the R K rows
    copy8(static_cast<const T*>(p.key) + row * p.key_stride_token + head * p.key_stride_head + channel,
          plane + ring_row * p.head_size + channel);
    copy8(static_cast<const T*>(p.value) + row * p.value_stride_token + head * p.value_stride_head + channel,
          plane + value_rows + ring_row * p.head_size + channel);
  }
}

}  // namespace kvtuner::cuda
