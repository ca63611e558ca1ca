// Torch-facing side of the CUDA ops: the argument checks of launcher_checks.h (shared with the CPU),
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
#include "launcher_checks.h"
#include "packed_format.h"

namespace {

// The CUDA kernels access the cache in 4-byte words: every plane section is a multiple of 4
// bytes, so the base and the plane strides must be too.
void check_cache_aligned(const at::Tensor& cache) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 4 == 0 && cache.stride(0) % 4 == 0 &&
                  cache.stride(1) % 4 == 0,
              "the CUDA kernels need kv_cache and its block and head strides 4-byte aligned, strides are ",
              cache.strides());
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

}  // namespace

void quantize_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                             const at::Tensor& slot_mapping, int64_t key_bits, int64_t value_bits,
                             int64_t group_size) {
  TORCH_CHECK(kv_cache.is_cuda(), "kv_cache must be on a CUDA device, got ", kv_cache.device());
  check_device(key, kv_cache, "key");
  check_device(value, kv_cache, "value");
  check_device(slot_mapping, kv_cache, "slot_mapping");
  kvtuner::check_cache_write(key, value, kv_cache, slot_mapping, key_bits, value_bits, group_size);
  check_cache_aligned(kv_cache);
  const kvtuner::ElemType dtype = kvtuner::elem_type(key, "key");
  const int64_t heads = key.size(1), head_size = key.size(2);

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
  kvtuner::check_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc, key_bits, value_bits,
                           group_size);
  check_cache_aligned(kv_cache);
  const kvtuner::ElemType dtype = kvtuner::elem_type(query, "query");
  const int64_t num_q_heads = query.size(1), head_size = query.size(2);
  const int64_t num_kv_heads = kv_cache.size(1), num_seqs = seq_lens.size(0);
  TORCH_CHECK(kvtuner::cuda::attention_supported(int(head_size), dtype), "the CUDA paged attention is built for ",
              "head sizes 64, 80, 96, 128 and 256, got ", head_size);
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
