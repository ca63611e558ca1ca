// Work split and dtype dispatch of paged attention (torch-free). The kernels themselves are
// instantiated per dtype in paged_attention_<dtype>.cu.
#include "cuda/kernels/paged_attention.cuh"

namespace kvtuner::cuda {

extern template void launch_paged_attention_typed<__nv_bfloat16>(const AttentionLaunch&, cudaStream_t);
extern template void launch_paged_attention_typed<__half>(const AttentionLaunch&, cudaStream_t);
extern template void launch_paged_attention_typed<float>(const AttentionLaunch&, cudaStream_t);

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// Split decode contexts until the decode grid has about kSplitTargetCtas blocks: a few decodes
// of long contexts then still fill the GPU, whatever else (a prefill chunk) shares the step.
// Nothing here reads seq_lens or max_seq_len: each sequence's partition length is derived on
// the device from its own length, so the grid of a captured CUDA graph stays valid.
AttentionPlan plan_attention(int64_t num_tokens, int num_seqs, int num_q_heads, int num_kv_heads, int head_size,
                             int max_query_len) {
  AttentionPlan plan{0, 1, 0, 0};
  if (num_seqs == 0 || num_tokens == 0 || max_query_len <= 0) return plan;
  const int group = num_q_heads / num_kv_heads;
  const int decode_query = max_query_len < kDecodeMaxQuery ? max_query_len : kDecodeMaxQuery;
  plan.decode_tiles_per_seq = int(ceil_div(int64_t(decode_query) * group, kDecodeRows));
  const int64_t decode_blocks = int64_t(num_seqs) * plan.decode_tiles_per_seq * num_kv_heads;
  if (decode_blocks < kSplitTargetCtas) {
    const int64_t parts = ceil_div(kSplitTargetCtas, decode_blocks);
    plan.num_partitions = int(parts < kMaxPartitions ? parts : kMaxPartitions);
  }
  if (plan.num_partitions > 1) {
    plan.workspace_bytes =
        decode_blocks * kDecodeRows * plan.num_partitions * (head_size + 2) * int64_t(sizeof(float));
  }
  if (max_query_len > kDecodeMaxQuery) {
    plan.prefill_tiles = num_tokens * group / prefill_tile_rows(head_size) + num_seqs;
  }
  return plan;
}

bool attention_supported(int head_size) {
  return head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256;
}

void launch_paged_attention(const AttentionLaunch& launch, cudaStream_t stream) {
  switch (launch.p.dtype) {
    case ElemType::kBFloat16: return launch_paged_attention_typed<__nv_bfloat16>(launch, stream);
    case ElemType::kFloat16: return launch_paged_attention_typed<__half>(launch, stream);
    case ElemType::kFloat32: return launch_paged_attention_typed<float>(launch, stream);
  }
}

}  // namespace kvtuner::cuda
