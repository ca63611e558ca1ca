// Kernel launches of paged attention, instantiated once per dtype in paged_attention_<dtype>.cu
// so that the dtypes compile in parallel.
#pragma once

#include "cuda/kernels/paged_attention.cuh"

namespace kvtuner::cuda {

template <typename T, int kHeadSize, bool kDecode>
void launch_tiles(const AttentionLaunch& launch, dim3 grid, cudaStream_t stream) {
  constexpr int kSharedBytes = int(sizeof(AttentionShared<kHeadSize, kDecode>));
  const auto kernel = paged_attention_kernel<T, kHeadSize, kDecode>;
  // Above 48 KiB a block's dynamic shared memory must be opted into (per function; cheap, and
  // allowed while a CUDA graph is captured). Every tile fits the 99 KiB of sm_86/sm_89.
  static_assert(kSharedBytes <= 99 * 1024, "tile exceeds the shared memory of sm_86 / sm_89");
  if (kSharedBytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  }
  KVT_LAUNCH(kernel, grid, kAttnThreads, kSharedBytes, stream, launch);
}

template <typename T, int kHeadSize>
void launch_paged_attention_for(const AttentionLaunch& launch, cudaStream_t stream) {
  const AttentionPlan& plan = launch.plan;
  const unsigned seqs = unsigned(launch.p.seqs.num_seqs), kv_heads = unsigned(launch.p.num_kv_heads);
  if (plan.decode_tiles_per_seq > 0) {
    const unsigned tiles = seqs * unsigned(plan.decode_tiles_per_seq);
    launch_tiles<T, kHeadSize, true>(launch, dim3(tiles, kv_heads, unsigned(plan.num_partitions)), stream);
    if (plan.num_partitions > 1) {
      const auto reduce = reduce_partitions_kernel<T, kHeadSize>;
      KVT_LAUNCH(reduce, dim3(tiles, kv_heads), kReduceThreads, 0, stream, launch);
    }
  }
  if (plan.prefill_tiles > 0) {
    launch_tiles<T, kHeadSize, false>(launch, dim3(unsigned(plan.prefill_tiles), kv_heads), stream);
  }
}

template <typename T>
void launch_paged_attention_typed(const AttentionLaunch& launch, cudaStream_t stream) {
  switch (launch.p.head_size) {
    case 64: return launch_paged_attention_for<T, 64>(launch, stream);
    case 80: return launch_paged_attention_for<T, 80>(launch, stream);
    case 96: return launch_paged_attention_for<T, 96>(launch, stream);
    case 128: return launch_paged_attention_for<T, 128>(launch, stream);
    default: return launch_paged_attention_for<T, 256>(launch, stream);
  }
}

}  // namespace kvtuner::cuda
