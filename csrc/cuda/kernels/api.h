// Host entry points of the CUDA kernels, free of torch headers: csrc/cuda/launchers.cu fills
// the shared parameter structs (kernel_params.h, via launcher_args.h), wraps them with what only
// the CUDA kernels need (a grid bound, the work split, debug-check bounds) and calls these
// functions; the kernel instantiations live in torch-free .cu files that compile in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernels/work_split.h"
#include "kernel_params.h"

namespace kvtuner::cuda {

using ::kvtuner::ElemType;

// quantize_and_cache: CacheWriteParams plus the block counts of the cache and the ring (debug
// checks only).
struct CacheWriteLaunch {
  CacheWriteParams p;
  int64_t num_cache_blocks, num_ring_blocks;
};

void launch_quantize_and_cache(const CacheWriteLaunch& launch, cudaStream_t stream);

// write_window: WindowWriteParams plus the grid bound (rows of key/value) and the ring's block count.
struct WindowWriteLaunch {
  WindowWriteParams p;
  int64_t num_rows;
  int64_t num_ring_blocks;  // debug checks only
};

void launch_write_window(const WindowWriteLaunch& launch, cudaStream_t stream);

struct AttentionLaunch {
  AttentionParams p;
  AttentionPlan plan;
  float* workspace;  // >= plan.workspace_bytes
  int64_t num_cache_blocks, num_ring_blocks;  // debug checks only
};

// True for the head sizes the attention kernels are instantiated for.
bool attention_supported(int head_size);

void launch_paged_attention(const AttentionLaunch& launch, cudaStream_t stream);

}  // namespace kvtuner::cuda
