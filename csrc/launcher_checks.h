// Argument checks shared by the CPU and CUDA launchers: one set of rules, one set of messages.
// Only ATen's core headers, so nvcc keeps compiling the CUDA launcher quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "packed_format.h"

namespace kvtuner {

inline ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be bfloat16, float16 or float32, got ", t.scalar_type());
  }
}

inline void check_bits(int64_t bits, const char* name) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8 || bits == 16, name, " must be 2, 4, 8 or 16, got ", bits);
}

// The rules of kvtuner_vllm/format.py (check_group_size), which the kernels rely on.
inline void check_format(int64_t head_size, int64_t group_size, int64_t key_bits, int64_t value_bits) {
  check_bits(key_bits, "key_bits");
  check_bits(value_bits, "value_bits");
  TORCH_CHECK(head_size % 16 == 0 && head_size > 0 && head_size <= 256,
              "head size must be a multiple of 16 and at most 256, got ", head_size);
  TORCH_CHECK(group_size == head_size ||
                  ((group_size == 32 || group_size == 64 || group_size == 128) && head_size % group_size == 0),
              "group_size ", group_size, " must divide the head size ", head_size, " (32, 64, 128 or the head size)");
}

// The cache is uint8[num_blocks, H_kv, block_size, C], each (block, head) plane contiguous.
inline void check_cache(const at::Tensor& cache, int64_t num_kv_heads, int64_t bytes_per_token) {
  TORCH_CHECK(cache.scalar_type() == at::kByte, "kv_cache must be uint8, got ", cache.scalar_type());
  TORCH_CHECK(cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ", cache.sizes());
  TORCH_CHECK(cache.size(1) == num_kv_heads, "kv_cache has ", cache.size(1), " KV heads, the inputs ", num_kv_heads);
  TORCH_CHECK(cache.size(3) == bytes_per_token, "kv_cache holds ", cache.size(3),
              " bytes per token, the format needs ", bytes_per_token, " (format.LayerFormat.bytes_per_token)");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == bytes_per_token,
              "each (block, head) plane of kv_cache must be contiguous, strides are ", cache.strides());
}

inline void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

// quantize_and_cache's arguments (shapes in csrc/ops.h); returns the checked page layout.
inline PlaneLayout check_cache_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_cache,
                                     const at::Tensor& slot_mapping, int64_t key_bits, int64_t value_bits,
                                     int64_t group_size) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key and value must both be [T, H_kv, D], got ",
              key.sizes(), " and ", value.sizes());
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "key and value dtypes differ");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key and value must be contiguous along the head dim");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 vector");
  TORCH_CHECK(slot_mapping.size(0) <= key.size(0), "slot_mapping has ", slot_mapping.size(0), " slots for ",
              key.size(0), " tokens");
  elem_type(key, "key");
  check_format(key.size(2), group_size, key_bits, value_bits);
  const PlaneLayout layout(int(key_bits), int(value_bits), int(key.size(2)), int(group_size),
                           int(key.element_size()), kv_cache.dim() == 4 ? int(kv_cache.size(2)) : 0);
  check_cache(kv_cache, key.size(1), layout.bytes_per_token);
  return layout;
}

// paged_attention's arguments (shapes in csrc/ops.h); returns the checked page layout.
inline PlaneLayout check_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                                   const at::Tensor& query_start_loc, int64_t key_bits, int64_t value_bits,
                                   int64_t group_size) {
  TORCH_CHECK(query.dim() == 3, "query must be [T, H_q, D], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(),
              "out must match query's shape and dtype, got ", out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query and out must be contiguous along the head dim");
  elem_type(query, "query");
  const int64_t num_q_heads = query.size(1), head_size = query.size(2);
  check_format(head_size, group_size, key_bits, value_bits);
  TORCH_CHECK(kv_cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ",
              kv_cache.sizes());
  const int64_t num_kv_heads = kv_cache.size(1);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "query heads (", num_q_heads,
              ") must be a multiple of KV heads (", num_kv_heads, ")");
  const PlaneLayout layout(int(key_bits), int(value_bits), int(head_size), int(group_size),
                           int(query.element_size()), int(kv_cache.size(2)));
  check_cache(kv_cache, num_kv_heads, layout.bytes_per_token);
  check_int32(block_table, "block_table");
  check_int32(seq_lens, "seq_lens");
  check_int32(query_start_loc, "query_start_loc");
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1, "block_table must be [num_seqs, max_blocks] "
              "with contiguous rows");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous(), "seq_lens must be a contiguous vector");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(block_table.size(0) >= num_seqs, "block_table has ", block_table.size(0), " rows for ", num_seqs,
              " sequences");
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.is_contiguous() && query_start_loc.size(0) == num_seqs + 1,
              "query_start_loc must be a contiguous vector of num_seqs + 1 = ", num_seqs + 1, " offsets");
  return layout;
}

}  // namespace kvtuner
