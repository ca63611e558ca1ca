// Kernel launches of paged attention, instantiated once per dtype in paged_attention_<dtype>.cu
// so that the dtypes compile in parallel.
#pragma once

#include "cuda/kernels/paged_attention.cuh"

namespace kvtuner::cuda {

template <typename T, int kHeadSize>
void launch_paged_attention_for(const AttentionParams& p, int64_t num_tokens, cudaStream_t stream) {
  const dim3 grid(unsigned(p.num_row_tiles), unsigned(p.num_kv_heads), unsigned(p.num_partitions));
  paged_attention_kernel<T, kHeadSize><<<grid, kAttnThreads, 0, stream>>>(p);
  if (p.num_partitions > 1) {
    reduce_partitions_kernel<T><<<dim3(unsigned(num_tokens), unsigned(p.num_q_heads)), kReduceThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_paged_attention_typed(const AttentionParams& p, int64_t num_tokens, cudaStream_t stream) {
  switch (p.head_size) {
    case 64: return launch_paged_attention_for<T, 64>(p, num_tokens, stream);
    case 80: return launch_paged_attention_for<T, 80>(p, num_tokens, stream);
    case 96: return launch_paged_attention_for<T, 96>(p, num_tokens, stream);
    case 128: return launch_paged_attention_for<T, 128>(p, num_tokens, stream);
    default: return launch_paged_attention_for<T, 256>(p, num_tokens, stream);
  }
}

}  // namespace kvtuner::cuda
