// From tensors to the kernels' parameter structs (kernel_params.h), with every check the
// kernels rely on: one set of rules and messages for the CPU and CUDA launchers. Only ATen's
// core headers, so nvcc keeps compiling the CUDA launcher quickly. Device placement and the
// value checks that read tensor data (slot and block ids) stay in the per-device launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "kernel_params.h"

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
  TORCH_CHECK(one_of(bits, kSupportedBits), name, " must be 2, 4, 8 or 16, got ", bits);
}

// The rules of kvtuner_vllm/format.py (LayerFormat, check_block_size), which the kernels rely on.
inline FormatArgs check_format(int64_t head_size, int64_t block_size, int64_t key_bits, int64_t value_bits,
                               int64_t group_size, int64_t key_group_size, int64_t residual_length) {
  check_bits(key_bits, "key_bits");
  check_bits(value_bits, "value_bits");
  TORCH_CHECK(head_size % kHeadSizeMultiple == 0 && head_size > 0 && head_size <= kMaxHeadSize,
              "head size must be a multiple of 16 and at most 256, got ", head_size);
  TORCH_CHECK(group_size == head_size || (one_of(group_size, kSupportedGroupSizes) && head_size % group_size == 0),
              "group_size ", group_size, " must divide the head size ", head_size, " (32, 64, 128 or the head size)");
  TORCH_CHECK(residual_length >= 0 && residual_length <= block_size, "residual_length ", residual_length,
              " must lie in [0, block_size = ", block_size, "]");
  TORCH_CHECK(key_group_size == 0 || (one_of(key_group_size, kSupportedKeyGroupSizes) &&
                                      block_size % key_group_size == 0 && residual_length >= key_group_size),
              "key_group_size ", key_group_size, " must be 0 (per-token keys) or 16, 32, 64 or 128 dividing the ",
              "block size ", block_size, " and at most residual_length ", residual_length);
  return FormatArgs{int(key_bits), int(value_bits), int(group_size), int(key_group_size), int(residual_length)};
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

inline void check_int32_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous() && t.size(0) == size, name,
              " must be a contiguous int32 vector of ", size, " entries, got ", t.scalar_type(), " ", t.sizes());
}

// [T, H, D] rows of the model dtype, contiguous along D.
inline void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t heads, int64_t head_size) {
  TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == head_size && t.stride(2) == 1, name,
              " must be [T, ", heads, ", ", head_size, "] and contiguous along the head dim, got ", t.sizes(), " ",
              t.strides());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline SequenceArgs sequence_args(const at::Tensor& query_start_loc, const at::Tensor& seq_lens) {
  const int64_t num_seqs = seq_lens.numel();
  check_int32_vector(seq_lens, "seq_lens", num_seqs);
  check_int32_vector(query_start_loc, "query_start_loc", num_seqs + 1);
  return SequenceArgs{query_start_loc.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), int(num_seqs)};
}

// The ring cache is [num_blocks, H_kv, R, 2D] in the model dtype (K rows, then V rows, per head).
inline RingArgs ring_args(const std::optional<at::Tensor>& ring_cache, const std::optional<at::Tensor>& ring_block_ids,
                          int64_t residual_length, at::ScalarType dtype, int64_t num_kv_heads, int64_t head_size,
                          int64_t num_seqs) {
  if (residual_length == 0) return RingArgs{nullptr, 0, 0, nullptr};
  TORCH_CHECK(ring_cache.has_value() && ring_block_ids.has_value(), "residual_length ", residual_length,
              " needs ring_cache and ring_block_ids");
  const at::Tensor& ring = *ring_cache;
  TORCH_CHECK(ring.dim() == 4 && ring.size(1) == num_kv_heads && ring.size(2) == residual_length &&
                  ring.size(3) == 2 * head_size,
              "ring_cache must be [num_blocks, ", num_kv_heads, ", ", residual_length, ", ", 2 * head_size, "], got ",
              ring.sizes());
  TORCH_CHECK(ring.scalar_type() == dtype, "ring_cache must be ", dtype, " (the model dtype), got ",
              ring.scalar_type());
  TORCH_CHECK(ring.stride(3) == 1 && ring.stride(2) == 2 * head_size,
              "each (block, head) plane of ring_cache must be contiguous, strides are ", ring.strides());
  check_int32_vector(*ring_block_ids, "ring_block_ids", num_seqs);
  return RingArgs{ring.data_ptr(), ring.stride(0), ring.stride(1), ring_block_ids->data_ptr<int32_t>()};
}

// The step's key and value rows [T, H_kv, D] (checked by check_rows), as every op's params hold them.
template <class Params>
void set_key_value(Params& p, const at::Tensor& key, const at::Tensor& value) {
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_stride_token = key.stride(0);
  p.key_stride_head = key.stride(1);
  p.value_stride_token = value.stride(0);
  p.value_stride_head = value.stride(1);
}

inline CacheWriteParams cache_write_params(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_cache,
                                           const at::Tensor& slot_mapping,
                                           const std::optional<at::Tensor>& ring_cache,
                                           const std::optional<at::Tensor>& ring_block_ids,
                                           const std::optional<at::Tensor>& query_start_loc,
                                           const std::optional<at::Tensor>& seq_lens, int64_t key_bits,
                                           int64_t value_bits, int64_t group_size, int64_t key_group_size,
                                           int64_t residual_length) {
  const ElemType dtype = elem_type(key, "key");
  TORCH_CHECK(key.dim() == 3, "key must be [T, H_kv, D], got ", key.sizes());
  const int64_t heads = key.size(1), head_size = key.size(2);
  check_rows(key, "key", key.scalar_type(), heads, head_size);
  check_rows(value, "value", key.scalar_type(), heads, head_size);
  TORCH_CHECK(value.size(0) == key.size(0), "key and value have ", key.size(0), " and ", value.size(0), " rows");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 vector");
  TORCH_CHECK(slot_mapping.size(0) <= key.size(0), "slot_mapping has ", slot_mapping.size(0), " slots for ",
              key.size(0), " rows");
  TORCH_CHECK(kv_cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ",
              kv_cache.sizes());
  const int64_t block_size = kv_cache.size(2);
  const FormatArgs format =
      check_format(head_size, block_size, key_bits, value_bits, group_size, key_group_size, residual_length);
  const PlaneLayout layout(format, int(head_size), int(key.element_size()), int(block_size));
  check_cache(kv_cache, heads, layout.bytes_per_token);

  CacheWriteParams p{};
  set_key_value(p, key, value);
  p.cache = kv_cache.data_ptr<uint8_t>();
  p.cache_stride_block = kv_cache.stride(0);
  p.cache_stride_head = kv_cache.stride(1);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = slot_mapping.size(0);
  p.num_kv_heads = int(heads);
  p.head_size = int(head_size);
  p.block_size = int(block_size);
  p.format = format;
  p.dtype = dtype;
  if (key_group_size > 0 && key_bits != 16) {
    TORCH_CHECK(query_start_loc.has_value() && seq_lens.has_value(),
                "kivi keys need query_start_loc and seq_lens (key groups complete at sequence positions)");
    p.seqs = sequence_args(*query_start_loc, *seq_lens);
    p.ring = ring_args(ring_cache, ring_block_ids, residual_length, key.scalar_type(), heads, head_size,
                       p.seqs.num_seqs);
  }
  return p;
}

inline AttentionParams attention_params(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value, const at::Tensor& kv_cache,
                                        const std::optional<at::Tensor>& ring_cache,
                                        const std::optional<at::Tensor>& ring_block_ids,
                                        const at::Tensor& block_table, const at::Tensor& seq_lens,
                                        const at::Tensor& query_start_loc, int64_t max_query_len,
                                        int64_t max_seq_len, double scale, int64_t key_bits, int64_t value_bits,
                                        int64_t group_size, int64_t key_group_size, int64_t residual_length,
                                        double softcap) {
  const ElemType dtype = elem_type(query, "query");
  TORCH_CHECK(query.dim() == 3, "query must be [T, H_q, D], got ", query.sizes());
  const int64_t num_q_heads = query.size(1), head_size = query.size(2);
  check_rows(query, "query", query.scalar_type(), num_q_heads, head_size);
  check_rows(out, "out", query.scalar_type(), num_q_heads, head_size);
  TORCH_CHECK(out.size(0) == query.size(0), "out has ", out.size(0), " rows, query ", query.size(0));
  TORCH_CHECK(kv_cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ",
              kv_cache.sizes());
  const int64_t num_kv_heads = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "query heads (", num_q_heads,
              ") must be a multiple of KV heads (", num_kv_heads, ")");
  check_rows(key, "key", query.scalar_type(), num_kv_heads, head_size);
  check_rows(value, "value", query.scalar_type(), num_kv_heads, head_size);
  TORCH_CHECK(key.size(0) >= query.size(0) && value.size(0) >= query.size(0), "key and value need a row per query row");
  const FormatArgs format =
      check_format(head_size, block_size, key_bits, value_bits, group_size, key_group_size, residual_length);
  const PlaneLayout layout(format, int(head_size), int(query.element_size()), int(block_size));
  check_cache(kv_cache, num_kv_heads, layout.bytes_per_token);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1,
              "block_table must be int32 [num_seqs, max_blocks] with contiguous rows");
  const SequenceArgs seqs = sequence_args(query_start_loc, seq_lens);
  TORCH_CHECK(block_table.size(0) >= seqs.num_seqs, "block_table has ", block_table.size(0), " rows for ",
              seqs.num_seqs, " sequences");
  TORCH_CHECK(max_query_len >= 0 && max_seq_len >= 0 && max_seq_len < INT32_MAX,
              "max_query_len and max_seq_len must be non-negative int32 bounds, got ", max_query_len, " and ",
              max_seq_len);

  AttentionParams p{};
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.query = query.data_ptr();
  p.query_stride_token = query.stride(0);
  p.query_stride_head = query.stride(1);
  set_key_value(p, key, value);
  p.cache = kv_cache.data_ptr<uint8_t>();
  p.cache_stride_block = kv_cache.stride(0);
  p.cache_stride_head = kv_cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.seqs = seqs;
  p.ring = ring_args(ring_cache, ring_block_ids, residual_length, query.scalar_type(), num_kv_heads, head_size,
                     seqs.num_seqs);
  p.num_q_heads = int(num_q_heads);
  p.num_kv_heads = int(num_kv_heads);
  p.head_size = int(head_size);
  p.block_size = int(block_size);
  p.max_query_len = int(max_query_len);
  p.max_seq_len = int(max_seq_len);
  p.format = format;
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.dtype = dtype;
  return p;
}

inline WindowWriteParams window_write_params(const at::Tensor& key, const at::Tensor& value,
                                             const at::Tensor& ring_cache, const at::Tensor& ring_block_ids,
                                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                             int64_t residual_length) {
  const ElemType dtype = elem_type(key, "key");
  TORCH_CHECK(key.dim() == 3, "key must be [T, H_kv, D], got ", key.sizes());
  const int64_t heads = key.size(1), head_size = key.size(2);
  check_rows(key, "key", key.scalar_type(), heads, head_size);
  check_rows(value, "value", key.scalar_type(), heads, head_size);
  TORCH_CHECK(residual_length > 0, "write_window needs residual_length > 0, got ", residual_length);
  WindowWriteParams p{};
  set_key_value(p, key, value);
  p.seqs = sequence_args(query_start_loc, seq_lens);
  p.ring = ring_args(ring_cache, ring_block_ids, residual_length, key.scalar_type(), heads, head_size,
                     p.seqs.num_seqs);
  p.num_kv_heads = int(heads);
  p.head_size = int(head_size);
  p.residual_length = int(residual_length);
  p.dtype = dtype;
  return p;
}

}  // namespace kvtuner
