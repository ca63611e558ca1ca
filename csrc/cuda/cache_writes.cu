// Launches of the cache writes: quantize_and_cache and write_window (torch-free;
// csrc/cuda/launchers.cu checks the arguments).
#include "cuda/kernels/quantize_and_cache.cuh"
#include "cuda/kernels/write_window.cuh"

namespace kvtuner::cuda {

namespace {

template <typename T>
void launch_cache_write_typed(const CacheWriteLaunch& launch, cudaStream_t stream) {
  const CacheWriteParams& p = launch.p;
  const int64_t items = p.num_tokens * p.num_kv_heads;  // (row, head) pairs, one team each
  const int64_t per_block = kQuantizeThreads / team_size(p.head_size);
  const auto tokens = quantize_tokens_kernel<T>;
  KVT_LAUNCH(tokens, dim3(unsigned((items + per_block - 1) / per_block)), kQuantizeThreads, 0, stream, launch);
  if (p.format.key_group_size > 0 && p.format.key_bits != kUnquantizedBits) {
    const auto kivi = quantize_kivi_keys_kernel<T>;
    KVT_LAUNCH(kivi, dim3(unsigned(p.num_tokens)), kKiviThreads, 0, stream, launch);
  }
}

template <typename T>
void launch_write_window_typed(const WindowWriteLaunch& launch, cudaStream_t stream) {
  const auto kernel = write_window_kernel<T>;
  KVT_LAUNCH(kernel, dim3(unsigned(launch.num_rows)), kWindowThreads, 0, stream, launch);
}

}  // namespace

void launch_quantize_and_cache(const CacheWriteLaunch& launch, cudaStream_t stream) {
  if (launch.p.num_tokens == 0 || launch.p.num_kv_heads == 0) return;
  switch (launch.p.dtype) {
    case ElemType::kBFloat16: return launch_cache_write_typed<__nv_bfloat16>(launch, stream);
    case ElemType::kFloat16: return launch_cache_write_typed<__half>(launch, stream);
    case ElemType::kFloat32: return launch_cache_write_typed<float>(launch, stream);
  }
}


void launch_write_window(const WindowWriteLaunch& launch, cudaStream_t stream) {
  if (launch.num_rows == 0 || launch.p.seqs.num_seqs == 0) return;
  switch (launch.p.dtype) {
    case ElemType::kBFloat16: return launch_write_window_typed<__nv_bfloat16>(launch, stream);
    case ElemType::kFloat16: return launch_write_window_typed<__half>(launch, stream);
    case ElemType::kFloat32: return launch_write_window_typed<float>(launch, stream);
  }
}

}  // namespace kvtuner::cuda
