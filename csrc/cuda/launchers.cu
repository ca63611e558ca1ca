// Torch-facing side of the CUDA ops: the same argument checks as csrc/cpu/launchers.cpp,
// plus what the CUDA kernels assume, then the torch-free launches of cuda/kernels/api.h.
//
// Headers are the narrow ATen/c10 ones on purpose: <torch/all.h> (and so ops.h) makes nvcc
// parse the whole C++ frontend, measured at 328 s of CPU for this file against 31 s now.
// The definitions below keep ops.h's signatures (torch_bindings.cpp registers them from
// there). <ATen/cuda/CUDAContext.h> does not compile without cuBLAS and cuSPARSE headers
// (see /work/shared/design/cuda-without-gpu.md); c10/cuda has what a launcher needs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/kernels/api.h"
#include "packed_format.h"

namespace {

using kvtuner::cuda::ElemType;

ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be bfloat16, float16 or float32, got ", t.scalar_type());
  }
}

void check_bits(int64_t bits, const char* name) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8 || bits == 16, name, " must be 2, 4, 8 or 16, got ", bits);
}

// Stricter than the CPU check on group sizes: the kernels reduce a group over G/8 lanes with
// xor shuffles, which needs G/8 to be a power of two or G to be the whole head (format.py
// allows exactly these).
void check_format(int64_t head_size, int64_t group_size, int64_t key_bits, int64_t value_bits) {
  check_bits(key_bits, "key_bits");
  check_bits(value_bits, "value_bits");
  TORCH_CHECK(head_size % 16 == 0 && head_size > 0 && head_size <= 256,
              "head size must be a multiple of 16 and at most 256, got ", head_size);
  TORCH_CHECK(group_size == head_size ||
                  ((group_size == 32 || group_size == 64 || group_size == 128) && head_size % group_size == 0),
              "group_size ", group_size, " must divide the head size ", head_size, " (32, 64, 128 or the head size)");
}

// The cache is uint8[num_blocks, H_kv, block_size, C], each (block, head) plane contiguous.
// The kernels access it in 4-byte words: every plane section is a multiple of 4 bytes, so
// the base and the plane strides must be too.
void check_cache(const at::Tensor& cache, int64_t num_kv_heads, int64_t bytes_per_token) {
  TORCH_CHECK(cache.scalar_type() == at::kByte, "kv_cache must be uint8, got ", cache.scalar_type());
  TORCH_CHECK(cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ", cache.sizes());
  TORCH_CHECK(cache.size(1) == num_kv_heads, "kv_cache has ", cache.size(1), " KV heads, the inputs ", num_kv_heads);
  TORCH_CHECK(cache.size(3) == bytes_per_token, "kv_cache holds ", cache.size(3),
              " bytes per token, the format needs ", bytes_per_token, " (format.LayerFormat.bytes_per_token)");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == bytes_per_token,
              "each (block, head) plane of kv_cache must be contiguous, strides are ", cache.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 4 == 0 && cache.stride(0) % 4 == 0 &&
                  cache.stride(1) % 4 == 0,
              "the CUDA kernels need kv_cache and its block and head strides 4-byte aligned, strides are ",
              cache.strides());
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

}  // namespace

void quantize_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                             const at::Tensor& slot_mapping, int64_t key_bits, int64_t value_bits,
                             int64_t group_size) {
  TORCH_CHECK(kv_cache.is_cuda(), "kv_cache must be on a CUDA device, got ", kv_cache.device());
  check_device(key, kv_cache, "key");
  check_device(value, kv_cache, "value");
  check_device(slot_mapping, kv_cache, "slot_mapping");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key and value must both be [T, H_kv, D], got ",
              key.sizes(), " and ", value.sizes());
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "key and value dtypes differ");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key and value must be contiguous along the head dim");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 vector");
  TORCH_CHECK(slot_mapping.size(0) <= key.size(0), "slot_mapping has ", slot_mapping.size(0), " slots for ",
              key.size(0), " tokens");
  const ElemType dtype = elem_type(key, "key");
  const int64_t heads = key.size(1), head_size = key.size(2);
  check_format(head_size, group_size, key_bits, value_bits);
  const kvtuner::PlaneLayout layout(key_bits, value_bits, head_size, group_size, key.element_size(),
                                    kv_cache.dim() == 4 ? kv_cache.size(2) : 0);
  check_cache(kv_cache, heads, layout.bytes_per_token);

  kvtuner::cuda::QuantizeParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_stride_token = key.stride(0);
  p.key_stride_head = key.stride(1);
  p.value_stride_token = value.stride(0);
  p.value_stride_head = value.stride(1);
  p.cache = kv_cache.data_ptr<uint8_t>();
  p.cache_stride_block = kv_cache.stride(0);
  p.cache_stride_head = kv_cache.stride(1);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = slot_mapping.size(0);
  p.num_kv_heads = int(heads);
  p.head_size = int(head_size);
  p.block_size = int(kv_cache.size(2));
  p.group_size = int(group_size);
  p.key_bits = int(key_bits);
  p.value_bits = int(value_bits);

  const c10::cuda::OptionalCUDAGuard guard(kv_cache.device());
  kvtuner::cuda::launch_quantize_and_cache(p, dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                          const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, int64_t max_query_len, int64_t max_seq_len,
                          double scale, int64_t key_bits, int64_t value_bits, int64_t group_size,
                          int64_t sliding_window, double softcap) {
  TORCH_CHECK(query.is_cuda(), "query must be on a CUDA device, got ", query.device());
  check_device(out, query, "out");
  check_device(kv_cache, query, "kv_cache");
  check_device(block_table, query, "block_table");
  check_device(seq_lens, query, "seq_lens");
  check_device(query_start_loc, query, "query_start_loc");
  TORCH_CHECK(query.dim() == 3, "query must be [T, H_q, D], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(),
              "out must match query's shape and dtype, got ", out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query and out must be contiguous along the head dim");
  const ElemType dtype = elem_type(query, "query");
  const int64_t num_q_heads = query.size(1), head_size = query.size(2);
  check_format(head_size, group_size, key_bits, value_bits);
  TORCH_CHECK(kvtuner::cuda::attention_supported(int(head_size), dtype), "the CUDA paged attention is built for ",
              "head sizes 64, 80, 96, 128 and 256, got ", head_size);
  TORCH_CHECK(kv_cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ",
              kv_cache.sizes());
  const int64_t num_kv_heads = kv_cache.size(1);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "query heads (", num_q_heads,
              ") must be a multiple of KV heads (", num_kv_heads, ")");
  const kvtuner::PlaneLayout layout(key_bits, value_bits, head_size, group_size, query.element_size(),
                                    kv_cache.size(2));
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
  // Unlike the CPU plan, which reads the exact lengths, the CUDA split is planned on the host
  // from these bounds without a device sync: max_seq_len must bound every seq_lens entry.
  TORCH_CHECK(max_query_len >= 0 && max_seq_len >= 0 && max_seq_len < INT32_MAX,
              "max_query_len and max_seq_len must be non-negative int32 bounds, got ", max_query_len, " and ",
              max_seq_len);

  kvtuner::cuda::AttentionParams p{};
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.query = query.data_ptr();
  p.query_stride_token = query.stride(0);
  p.query_stride_head = query.stride(1);
  p.cache = kv_cache.data_ptr<uint8_t>();
  p.cache_stride_block = kv_cache.stride(0);
  p.cache_stride_head = kv_cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.num_seqs = int(num_seqs);
  p.num_q_heads = int(num_q_heads);
  p.num_kv_heads = int(num_kv_heads);
  p.head_size = int(head_size);
  p.block_size = int(kv_cache.size(2));
  p.group_size = int(group_size);
  p.key_bits = int(key_bits);
  p.value_bits = int(value_bits);
  p.sliding_window = int(sliding_window);
  p.scale = float(scale);
  p.softcap = float(softcap);
  if (num_seqs == 0 || query.size(0) == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t workspace_floats =
      kvtuner::cuda::plan_attention(p, query.size(0), int(max_query_len), int(max_seq_len));
  at::Tensor workspace;
  if (workspace_floats > 0) {
    workspace = at::empty({workspace_floats}, query.options().dtype(at::kFloat));
    p.partial_out = workspace.data_ptr<float>();
    p.partial_stats = p.partial_out + query.size(0) * num_q_heads * p.num_partitions * head_size;
  }
  kvtuner::cuda::launch_paged_attention(p, query.size(0), dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
