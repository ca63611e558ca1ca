// The op contract between the registration file and the CPU / CUDA launchers.
// Schemas (torch_bindings.cpp) and Python wrappers (kvtuner_vllm/ops.py) mirror these.
//
//   key, value      [T, H_kv, D]  model dtype; stride(2) == 1, stride(1) == D
//   kv_cache        uint8 [num_blocks, H_kv, block_size, C]; each (block, head) plane
//                   is block_size * C contiguous bytes (kvtuner_vllm/format.py)
//   slot_mapping    int64 [T'] (T' <= T); slot < 0 = padding, skipped
//   query, out      [T, H_q, D] model dtype
//   block_table     int32 [num_seqs, max_blocks_per_seq]
//   seq_lens        int32 [num_seqs]   tokens in the cache, this step's included
//   query_start_loc int32 [num_seqs + 1]
//   sliding_window  <= 0: none;  softcap  <= 0: none
#pragma once

#include <torch/all.h>

void quantize_and_cache_cpu(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                            const torch::Tensor& slot_mapping, int64_t key_bits, int64_t value_bits,
                            int64_t group_size);

void paged_attention_cpu(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& kv_cache,
                         const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                         const torch::Tensor& query_start_loc, int64_t max_query_len, int64_t max_seq_len,
                         double scale, int64_t key_bits, int64_t value_bits, int64_t group_size,
                         int64_t sliding_window, double softcap);

#ifdef KVTUNER_WITH_CUDA
void quantize_and_cache_cuda(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                             const torch::Tensor& slot_mapping, int64_t key_bits, int64_t value_bits,
                             int64_t group_size);

void paged_attention_cuda(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& kv_cache,
                          const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                          const torch::Tensor& query_start_loc, int64_t max_query_len, int64_t max_seq_len,
                          double scale, int64_t key_bits, int64_t value_bits, int64_t group_size,
                          int64_t sliding_window, double softcap);
#endif
