// Launch of the cache write kernel (torch-free; csrc/cuda/launchers.cu checks the arguments).
#include "cuda/kernels/quantize_and_cache.cuh"

namespace kvtuner::cuda {

void launch_quantize_and_cache(const QuantizeParams& p, ElemType dtype, cudaStream_t stream) {
  const int64_t items = p.num_tokens * p.num_kv_heads;  // (token, head) pairs, one team each
  if (items == 0) return;
  const int64_t per_block = kQuantizeThreads / team_size(p.head_size);
  const dim3 grid(unsigned((items + per_block - 1) / per_block));
  switch (dtype) {
    case ElemType::kBFloat16: return quantize_and_cache_kernel<__nv_bfloat16><<<grid, kQuantizeThreads, 0, stream>>>(p);
    case ElemType::kFloat16: return quantize_and_cache_kernel<__half><<<grid, kQuantizeThreads, 0, stream>>>(p);
    case ElemType::kFloat32: return quantize_and_cache_kernel<float><<<grid, kQuantizeThreads, 0, stream>>>(p);
  }
}

}  // namespace kvtuner::cuda
