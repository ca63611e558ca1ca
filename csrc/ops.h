// The op contract between the registration file and the CPU / CUDA launchers. Schemas
// (torch_bindings.cpp) and Python wrappers (kvtuner_vllm/ops.py) mirror these; format.py
// holds the reference of each op.
//
//   key, value      [T, H_kv, D]  model dtype; stride(2) == 1
//   kv_cache        uint8 [num_blocks, H_kv, block_size, C]; each (block, head) plane
//                   is block_size * C contiguous bytes (kvtuner_vllm/format.py)
//   ring_cache      [num_ring_blocks, H_kv, R, 2D] model dtype, per-request window rings
//   ring_block_ids  int32 [num_seqs]   each sequence's ring block
//   slot_mapping    int64 [T'] (T' <= T); slot < 0 = padding, skipped
//   query, out      [T, H_q, D] model dtype
//   block_table     int32 [num_seqs, max_blocks_per_seq]
//   seq_lens        int32 [num_seqs]   tokens in the cache, this step's included
//   query_start_loc int32 [num_seqs + 1]
//   key_group_size  kivi token group (0: per-token keys); residual_length R (0: no window)
//   softcap         <= 0: none
//   workspace       optional scratch for split-key partial results (CUDA: from vLLM's workspace
//                   manager, sized by attention_workspace_size); without it the launcher allocates
#pragma once

#include <torch/all.h>

#include <optional>
#include <string>
#include <tuple>

#define KVTUNER_OP_SIGNATURES(SUFFIX)                                                                              \
  void quantize_and_cache_##SUFFIX(                                                                                \
      const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,                               \
      const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& ring_cache,                           \
      const std::optional<torch::Tensor>& ring_block_ids, const std::optional<torch::Tensor>& query_start_loc,     \
      const std::optional<torch::Tensor>& seq_lens, int64_t key_bits, int64_t value_bits, int64_t group_size,      \
      int64_t key_group_size, int64_t residual_length);                                                            \
  void paged_attention_##SUFFIX(                                                                                   \
      torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,        \
      const torch::Tensor& kv_cache, const std::optional<torch::Tensor>& ring_cache,                               \
      const std::optional<torch::Tensor>& ring_block_ids, const torch::Tensor& block_table,                        \
      const torch::Tensor& seq_lens, const torch::Tensor& query_start_loc, int64_t max_query_len,                  \
      int64_t max_seq_len, double scale, int64_t key_bits, int64_t value_bits, int64_t group_size,                 \
      int64_t key_group_size, int64_t residual_length, double softcap,                                             \
      const std::optional<torch::Tensor>& workspace);                                                              \
  void write_window_##SUFFIX(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& ring_cache,      \
                             const torch::Tensor& ring_block_ids, const torch::Tensor& query_start_loc,            \
                             const torch::Tensor& seq_lens, int64_t residual_length);

KVTUNER_OP_SIGNATURES(cpu)

// What the CPU paged_attention ran since the last reset (cpu/route_counts.h): work items and
// sequences per route, the vector kernel's build and the best matrix unit the CPU offers.
std::tuple<c10::Dict<std::string, int64_t>, c10::Dict<std::string, int64_t>, std::string, std::string>
cpu_route_counts();
void reset_cpu_route_counts();

#ifdef KVTUNER_WITH_CUDA
KVTUNER_OP_SIGNATURES(cuda)
#endif
