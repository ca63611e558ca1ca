// Paged attention kernels for one model dtype (a file per dtype so they compile in parallel).
#include "cuda/kernels/paged_attention_launch.cuh"

namespace kvtuner::cuda {
template void launch_paged_attention_typed<float>(const AttentionLaunch&, cudaStream_t);
}  // namespace kvtuner::cuda
