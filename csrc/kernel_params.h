// The arguments of every kernel, as one torch-free struct per op: launcher_args.h fills them
// from tensors (one set of checks for CPU and CUDA), the CPU and CUDA kernels read them.
// Strides are in elements of the tensor's own dtype (bytes for the uint8 packed cache).
#pragma once

#include <cstdint>

#include "packed_format.h"

namespace kvtuner {

// A step's varlen batch: sequence s owns rows [query_start_loc[s], query_start_loc[s + 1])
// at positions seq_lens[s] - (its row count) .. seq_lens[s] - 1.
struct SequenceArgs {
  const int32_t* query_start_loc;
  const int32_t* seq_lens;
  int num_seqs;
};

// One sequence of the step, for CPU and CUDA alike: its rows [start, start + rows) of
// query/key/value sit at positions first .. first + rows - 1.
struct SequenceRows {
  int start, rows, first;
};

KVT_HOST_DEVICE SequenceRows sequence_rows(const SequenceArgs& seqs, int seq) {
  const int start = seqs.query_start_loc[seq];
  const int rows = seqs.query_start_loc[seq + 1] - start;
  return SequenceRows{start, rows, seqs.seq_lens[seq] - rows};
}

// The per-request rings of the full-precision window: ring block ring_block_ids[s] holds, per
// KV head, K rows [R][D] then V rows [R][D] in the model dtype (format.py); null without a window.
struct RingArgs {
  void* ring;
  int64_t stride_block, stride_head;  // in elements
  const int32_t* block_ids;           // [num_seqs]
};

// quantize_and_cache: packed pages for every row with a slot; kivi key groups completed by the step.
struct CacheWriteParams {
  const void* key;
  const void* value;
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  uint8_t* cache;
  int64_t cache_stride_block, cache_stride_head;
  const int64_t* slot_mapping;  // [num_tokens]; < 0: padding
  int64_t num_tokens;
  SequenceArgs seqs;  // kivi keys only (null pointers otherwise)
  RingArgs ring;      // kivi keys only: a group's positions from earlier steps
  int num_kv_heads, head_size, block_size;
  FormatArgs format;
  ElemType dtype;
};

// paged_attention: each query row over the packed pages, its ring and the step's own key/value.
struct AttentionParams {
  void* out;
  int64_t out_stride_token, out_stride_head;
  const void* query;
  int64_t query_stride_token, query_stride_head;
  const void* key;  // the step's rows, aligned with query's
  const void* value;
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  const uint8_t* cache;
  int64_t cache_stride_block, cache_stride_head;
  const int32_t* block_table;
  int64_t block_table_stride;
  SequenceArgs seqs;
  RingArgs ring;
  int num_q_heads, num_kv_heads, head_size, block_size;
  int max_query_len, max_seq_len;  // host-side bounds of the batch
  FormatArgs format;
  float scale, softcap;  // softcap <= 0: none
  ElemType dtype;
};

// write_window: each sequence's last min(R, rows) rows into its ring at position mod R.
struct WindowWriteParams {
  const void* key;
  const void* value;
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  SequenceArgs seqs;
  RingArgs ring;
  int num_kv_heads, head_size, residual_length;
  ElemType dtype;
};

}  // namespace kvtuner
