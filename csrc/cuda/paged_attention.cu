// Dtype dispatch of paged attention (torch-free; the work split is cuda/kernels/work_split.h).
// The kernels themselves are instantiated per dtype in paged_attention_<dtype>.cu.
#include "cuda/kernels/paged_attention.cuh"

namespace kvtuner::cuda {

extern template void launch_paged_attention_typed<__nv_bfloat16>(const AttentionLaunch&, cudaStream_t);
extern template void launch_paged_attention_typed<__half>(const AttentionLaunch&, cudaStream_t);
extern template void launch_paged_attention_typed<float>(const AttentionLaunch&, cudaStream_t);

bool attention_supported(int head_size) { return one_of(head_size, kSupportedHeadSizes); }

void launch_paged_attention(const AttentionLaunch& launch, cudaStream_t stream) {
  switch (launch.p.dtype) {
    case ElemType::kBFloat16: return launch_paged_attention_typed<__nv_bfloat16>(launch, stream);
    case ElemType::kFloat16: return launch_paged_attention_typed<__half>(launch, stream);
    case ElemType::kFloat32: return launch_paged_attention_typed<float>(launch, stream);
  }
}

}  // namespace kvtuner::cuda
