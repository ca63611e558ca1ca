// Host entry points of the CUDA kernels, free of torch headers: the torch launchers
// (csrc/cuda/ops.cu) check arguments, fill these structs and call these functions, and
// the kernel instantiations live in torch-free .cu files that compile in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "packed_format.h"

namespace kvtuner::cuda {

using ::kvtuner::ElemType;

struct QuantizeParams {
  const void* key;
  const void* value;
  int64_t key_stride_token, key_stride_head;  // in elements
  int64_t value_stride_token, value_stride_head;
  uint8_t* cache;
  int64_t cache_stride_block, cache_stride_head;  // in bytes
  const int64_t* slot_mapping;
  int64_t num_tokens;
  int num_kv_heads, head_size, block_size, group_size, key_bits, value_bits;
};

void launch_quantize_and_cache(const QuantizeParams& params, ElemType dtype, cudaStream_t stream);

struct AttentionParams {
  void* out;
  int64_t out_stride_token, out_stride_head;  // in elements
  const void* query;
  int64_t query_stride_token, query_stride_head;
  const uint8_t* cache;
  int64_t cache_stride_block, cache_stride_head;  // in bytes
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  int num_seqs, num_q_heads, num_kv_heads, head_size, block_size, group_size, key_bits, value_bits;
  int sliding_window;    // <= 0: none
  float scale, softcap;  // softcap <= 0: none
  // Work split, chosen by plan_attention.
  int64_t num_row_tiles;   // blocks along x: an upper bound on the (sequence, row tile) pairs
  int num_partitions;      // 1: each block writes the output itself
  int partition_len;       // keys per partition, a multiple of the chunk size
  float* partial_out;      // [num_tokens, num_q_heads, num_partitions, head_size]
  float* partial_stats;    // [num_tokens, num_q_heads, num_partitions, 2]: running max, sum
};

// Fills the work-split fields of `params`; returns the floats of workspace it needs
// (0 when no reduction runs).
int64_t plan_attention(AttentionParams& params, int64_t num_tokens, int max_query_len, int max_seq_len);

// True for the head sizes and dtypes the attention kernel is instantiated for.
bool attention_supported(int head_size, ElemType dtype);

void launch_paged_attention(const AttentionParams& params, int64_t num_tokens, ElemType dtype,
                            cudaStream_t stream);

}  // namespace kvtuner::cuda
