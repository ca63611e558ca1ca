// C entry points over the CUDA kernels run by the host emulator (emulator.h), for
// tests/kernels/test_cuda_emulated.py. The launches mirror csrc/cuda/quantize_and_cache.cu
// and csrc/cuda/kernels/paged_attention_launch.cuh; the work split is the real one
// (csrc/cuda/paged_attention.cu, included below).
#include "emulator.h"

#include "cuda/kernels/paged_attention.cuh"
#include "cuda/kernels/quantize_and_cache.cuh"

namespace kvtuner::cuda {

template <typename T, int kHeadSize>
void emulate_attention(const AttentionParams& p, int64_t num_tokens) {
  emu_launch(dim3(unsigned(p.num_row_tiles), p.num_kv_heads, p.num_partitions), kAttnThreads,
             [&] { paged_attention_kernel<T, kHeadSize>(p); });
  if (p.num_partitions > 1) {
    emu_launch(dim3(unsigned(num_tokens), p.num_q_heads, 1), kReduceThreads, [&] { reduce_partitions_kernel<T>(p); });
  }
}

template <typename T>
void launch_paged_attention_typed(const AttentionParams& p, int64_t num_tokens, cudaStream_t) {
  switch (p.head_size) {
    case 64: return emulate_attention<T, 64>(p, num_tokens);
    case 80: return emulate_attention<T, 80>(p, num_tokens);
    case 96: return emulate_attention<T, 96>(p, num_tokens);
    case 128: return emulate_attention<T, 128>(p, num_tokens);
    default: return emulate_attention<T, 256>(p, num_tokens);
  }
}

}  // namespace kvtuner::cuda

#include "cuda/paged_attention.cu"

namespace kvtuner::cuda {
template void launch_paged_attention_typed<__nv_bfloat16>(const AttentionParams&, int64_t, cudaStream_t);
template void launch_paged_attention_typed<__half>(const AttentionParams&, int64_t, cudaStream_t);
template void launch_paged_attention_typed<float>(const AttentionParams&, int64_t, cudaStream_t);
}  // namespace kvtuner::cuda

using namespace kvtuner::cuda;

extern "C" void emu_quantize_and_cache(const QuantizeParams* p, int dtype) {
  const int64_t items = p->num_tokens * p->num_kv_heads;
  const int64_t per_block = kQuantizeThreads / team_size(p->head_size);
  const dim3 grid(unsigned((items + per_block - 1) / per_block));
  switch (ElemType(dtype)) {
    case ElemType::kBFloat16:
      return emu_launch(grid, kQuantizeThreads, [&] { quantize_and_cache_kernel<__nv_bfloat16>(*p); });
    case ElemType::kFloat16: return emu_launch(grid, kQuantizeThreads, [&] { quantize_and_cache_kernel<__half>(*p); });
    case ElemType::kFloat32: return emu_launch(grid, kQuantizeThreads, [&] { quantize_and_cache_kernel<float>(*p); });
  }
}

extern "C" void emu_paged_attention(AttentionParams* p, int64_t num_tokens, int max_query_len, int max_seq_len,
                                    int dtype) {
  std::vector<float> workspace(plan_attention(*p, num_tokens, max_query_len, max_seq_len));
  if (!workspace.empty()) {
    p->partial_out = workspace.data();
    p->partial_stats = p->partial_out + num_tokens * p->num_q_heads * p->num_partitions * p->head_size;
  }
  launch_paged_attention(*p, num_tokens, ElemType(dtype), nullptr);
}
