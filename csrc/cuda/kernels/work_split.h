// The CUDA paged_attention's work split (see paged_attention.cuh for the kernels). Plain C++,
// free of torch and of the CUDA runtime: the CUDA launcher plans every batch with it, and the
// extension, CPU-only builds included, exports the workspace sizes it implies
// (torch.ops.kvtuner.attention_workspace_size), so vLLM can reserve them before any CUDA call.
//
// Two kernels share one body and split the sequences between them by query length:
// * the decode kernel takes sequences with q_len <= kDecodeMaxQuery (decode, speculative
//   decode, short chunks) in tiles of kDecodeRows (query token, query head) rows, and splits
//   their context into num_partitions partitions merged by a reduce kernel;
// * the prefill kernel takes the longer ones in tiles of 32-64 rows, unsplit.
// Every grid dimension is a function of (num_seqs, num_tokens, heads, head size,
// max_query_len) only: the kernels read seq_lens and query_start_loc on the device, and the
// partition length of each sequence is derived there from its own seq_len.
#pragma once

#include <cstdint>

namespace kvtuner::cuda {

constexpr int kDecodeRows = 8;         // rows per decode tile: a GQA group of up to 8 heads
constexpr int kDecodeMaxQuery = 16;    // longest query the decode kernel takes
constexpr int kSplitTargetCtas = 1024;  // split until the decode grid has about this many blocks
constexpr int kMaxPartitions = 128;
constexpr int kPartitionGranule = 256;  // partition lengths are multiples of this many keys

// Rows per prefill tile: 64, or 32 for head size 256 (shared memory and registers).
constexpr int prefill_tile_rows(int head_size) { return head_size > 128 ? 32 : 64; }

struct AttentionPlan {
  int decode_tiles_per_seq;  // tiles of every sequence in the decode grid
  int num_partitions;        // context partitions of the decode kernel (1: no reduce)
  int64_t prefill_tiles;     // blocks along x of the prefill grid (0: not launched)
  int64_t workspace_bytes;   // partial results of the split (0 when num_partitions == 1)
};

// Split decode contexts until the decode grid has about kSplitTargetCtas blocks: a few decodes
// of long contexts then still fill the GPU, whatever else (a prefill chunk) shares the step.
// Nothing here reads seq_lens or max_seq_len: each sequence's partition length is derived on
// the device from its own length, so the grid of a captured CUDA graph stays valid.
inline AttentionPlan plan_attention(int64_t num_tokens, int num_seqs, int num_q_heads, int num_kv_heads,
                                    int head_size, int max_query_len) {
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
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

// Bytes of scratch a batch of num_seqs sequences whose queries are at most max_query_len tokens
// needs (the split's partial results; 0: no split). The plan's workspace does not depend on
// the number of tokens.
inline int64_t attention_workspace_bytes(int num_seqs, int max_query_len, int num_q_heads, int num_kv_heads,
                                         int head_size) {
  if (num_seqs <= 0 || max_query_len <= 0) return 0;
  return plan_attention(1, num_seqs, num_q_heads, num_kv_heads, head_size, max_query_len).workspace_bytes;
}

// The largest attention_workspace_bytes over every batch: beyond kDecodeMaxQuery query tokens
// or kSplitTargetCtas sequences nothing more is split.
inline int64_t max_attention_workspace_bytes(int num_q_heads, int num_kv_heads, int head_size) {
  int64_t largest = 0;
  for (int query_len = 1; query_len <= kDecodeMaxQuery; ++query_len) {
    for (int num_seqs = 1; num_seqs <= kSplitTargetCtas; ++num_seqs) {
      const int64_t bytes = attention_workspace_bytes(num_seqs, query_len, num_q_heads, num_kv_heads, head_size);
      if (bytes > largest) largest = bytes;
    }
  }
  return largest;
}

}  // namespace kvtuner::cuda
