// Work split and dtype dispatch of paged attention (torch-free). The kernels themselves are
// instantiated per dtype in paged_attention_<dtype>.cu.
#include <climits>

#include "cuda/kernels/paged_attention.cuh"

namespace kvtuner::cuda {

extern template void launch_paged_attention_typed<__nv_bfloat16>(const AttentionParams&, int64_t, cudaStream_t);
extern template void launch_paged_attention_typed<__half>(const AttentionParams&, int64_t, cudaStream_t);
extern template void launch_paged_attention_typed<float>(const AttentionParams&, int64_t, cudaStream_t);

namespace {

// Splitting the keys pays when few query rows leave the GPU idle (decode, speculative
// decode, a short chunk next to decodes); with longer queries the row tiles alone fill it and
// a split would only cost a workspace of num_tokens * heads * partitions * head_size floats.
constexpr int kSplitMaxQueryLen = 32;
constexpr int kPartitionLen = 512;  // 2 chunks: long enough to amortize the merge
constexpr int64_t kMaxWorkspaceFloats = int64_t(64) << 20;  // 256 MiB; beyond it, no split

}  // namespace

int64_t plan_attention(AttentionParams& p, int64_t num_tokens, int max_query_len, int max_seq_len) {
  const int group = p.num_q_heads / p.num_kv_heads;
  // tile_begin(num_seqs) <= num_tokens * group / kRows + num_seqs bounds the row tiles.
  p.num_row_tiles = num_tokens * group / kRows + p.num_seqs;
  p.num_partitions = 1;
  p.partition_len = INT_MAX;
  p.partial_out = nullptr;
  p.partial_stats = nullptr;
  if (max_query_len > kSplitMaxQueryLen || max_seq_len <= kPartitionLen) return 0;
  int64_t len = kPartitionLen;
  while ((max_seq_len + len - 1) / len > kMaxPartitions) len *= 2;
  const int64_t parts = (max_seq_len + len - 1) / len;
  const int64_t workspace = num_tokens * p.num_q_heads * parts * (p.head_size + 2);
  if (workspace > kMaxWorkspaceFloats) return 0;
  p.partition_len = int(len);
  p.num_partitions = int(parts);
  return workspace;
}

bool attention_supported(int head_size, ElemType dtype) {
  (void)dtype;  // every model dtype is instantiated
  return head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256;
}

void launch_paged_attention(const AttentionParams& p, int64_t num_tokens, ElemType dtype, cudaStream_t stream) {
  if (p.num_row_tiles == 0 || p.num_kv_heads == 0) return;
  switch (dtype) {
    case ElemType::kBFloat16: return launch_paged_attention_typed<__nv_bfloat16>(p, num_tokens, stream);
    case ElemType::kFloat16: return launch_paged_attention_typed<__half>(p, num_tokens, stream);
    case ElemType::kFloat32: return launch_paged_attention_typed<float>(p, num_tokens, stream);
  }
}

}  // namespace kvtuner::cuda
