// Torch-facing side of the CUDA ops: the argument checks and parameter structs of
// launcher_args.h (shared with the CPU), the CUDA-only checks (device, alignment, head size,
// workspace), then the torch-free launches of cuda/kernels/api.h. Nothing here reads tensor
// data on the host (no device sync): the index checks that need the data run on the device in
// KVTUNER_DEBUG_CHECKS=1 builds.
//
// Headers are the narrow ATen/c10 ones on purpose: <torch/all.h> (and so ops.h) makes nvcc
// parse the whole C++ frontend, which multiplies this file's compile time. The definitions
// below keep ops.h's signatures (torch_bindings.cpp registers them from there).
// <ATen/cuda/CUDAContext.h> does not compile without cuBLAS and cuSPARSE headers (see
// docs/cuda-without-gpu.md); c10/cuda has what a launcher needs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>

#include "cuda/kernels/api.h"
#include "launcher_args.h"

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

void check_device(const std::optional<at::Tensor>& t, const at::Tensor& ref, const char* name) {
  if (t.has_value()) check_device(*t, ref, name);
}

int64_t num_blocks(const std::optional<at::Tensor>& t) { return t.has_value() ? t->size(0) : 0; }

// The split's partial results: the caller's workspace (vLLM's workspace manager, sized by
// kvtuner_vllm.ops.attention_workspace_size) or, without one, a fresh allocation.
float* attention_workspace(const std::optional<at::Tensor>& workspace, int64_t bytes, const at::Tensor& query,
                           at::Tensor& allocated) {
  if (bytes == 0) return nullptr;
  if (!workspace.has_value()) {
    allocated = at::empty({bytes}, query.options().dtype(at::kByte));
    return static_cast<float*>(allocated.data_ptr());
  }
  const at::Tensor& w = *workspace;
  check_device(w, query, "workspace");
  TORCH_CHECK(w.is_contiguous() && w.nbytes() >= size_t(bytes), "workspace must be contiguous and hold at least ",
              bytes, " bytes for this batch (kvtuner_vllm.ops.attention_workspace_size), got ", w.nbytes(), " bytes");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "workspace must be 16-byte aligned");
  return static_cast<float*>(w.data_ptr());
}

}  // namespace

void quantize_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                             const at::Tensor& slot_mapping, const std::optional<at::Tensor>& ring_cache,
                             const std::optional<at::Tensor>& ring_block_ids,
                             const std::optional<at::Tensor>& query_start_loc,
                             const std::optional<at::Tensor>& seq_lens, int64_t key_bits, int64_t value_bits,
                             int64_t group_size, int64_t key_group_size, int64_t residual_length) {
  TORCH_CHECK(kv_cache.is_cuda(), "kv_cache must be on a CUDA device, got ", kv_cache.device());
  check_device(key, kv_cache, "key");
  check_device(value, kv_cache, "value");
  check_device(slot_mapping, kv_cache, "slot_mapping");
  check_device(ring_cache, kv_cache, "ring_cache");
  check_device(ring_block_ids, kv_cache, "ring_block_ids");
  check_device(query_start_loc, kv_cache, "query_start_loc");
  check_device(seq_lens, kv_cache, "seq_lens");
  const kvtuner::cuda::CacheWriteLaunch launch{
      kvtuner::cache_write_params(key, value, kv_cache, slot_mapping, ring_cache, ring_block_ids, query_start_loc,
                                  seq_lens, key_bits, value_bits, group_size, key_group_size, residual_length),
      kv_cache.size(0), num_blocks(ring_cache)};
  check_cache_aligned(kv_cache);

  const c10::cuda::OptionalCUDAGuard guard(kv_cache.device());
  kvtuner::cuda::launch_quantize_and_cache(launch, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const at::Tensor& kv_cache, const std::optional<at::Tensor>& ring_cache,
                          const std::optional<at::Tensor>& ring_block_ids, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const at::Tensor& query_start_loc, int64_t max_query_len,
                          int64_t max_seq_len, double scale, int64_t key_bits, int64_t value_bits,
                          int64_t group_size, int64_t key_group_size, int64_t residual_length, double softcap,
                          const std::optional<at::Tensor>& workspace) {
  TORCH_CHECK(query.is_cuda(), "query must be on a CUDA device, got ", query.device());
  check_device(out, query, "out");
  check_device(key, query, "key");
  check_device(value, query, "value");
  check_device(kv_cache, query, "kv_cache");
  check_device(ring_cache, query, "ring_cache");
  check_device(ring_block_ids, query, "ring_block_ids");
  check_device(block_table, query, "block_table");
  check_device(seq_lens, query, "seq_lens");
  check_device(query_start_loc, query, "query_start_loc");
  kvtuner::cuda::AttentionLaunch launch{};
  launch.p = kvtuner::attention_params(out, query, key, value, kv_cache, ring_cache, ring_block_ids, block_table,
                                       seq_lens, query_start_loc, max_query_len, max_seq_len, scale, key_bits,
                                       value_bits, group_size, key_group_size, residual_length, softcap);
  check_cache_aligned(kv_cache);
  TORCH_CHECK(kvtuner::cuda::attention_supported(launch.p.head_size), "the CUDA paged attention is built for ",
              "head sizes 64, 80, 96, 128 and 256, got ", launch.p.head_size);
  // The grid comes from these host-side bounds only (no device sync): max_query_len must bound
  // every query length of the batch (the kernels check it in debug builds).
  launch.plan = kvtuner::cuda::plan_attention(query.size(0), launch.p.seqs.num_seqs, launch.p.num_q_heads,
                                              launch.p.num_kv_heads, launch.p.head_size, launch.p.max_query_len);
  launch.num_cache_blocks = kv_cache.size(0);
  launch.num_ring_blocks = num_blocks(ring_cache);
  if (launch.plan.decode_tiles_per_seq == 0 && launch.plan.prefill_tiles == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(query.device());
  at::Tensor allocated;
  launch.workspace = attention_workspace(workspace, launch.plan.workspace_bytes, query, allocated);
  kvtuner::cuda::launch_paged_attention(launch, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_window_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& ring_cache,
                       const at::Tensor& ring_block_ids, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                       int64_t residual_length) {
  TORCH_CHECK(ring_cache.is_cuda(), "ring_cache must be on a CUDA device, got ", ring_cache.device());
  check_device(key, ring_cache, "key");
  check_device(value, ring_cache, "value");
  check_device(ring_block_ids, ring_cache, "ring_block_ids");
  check_device(query_start_loc, ring_cache, "query_start_loc");
  check_device(seq_lens, ring_cache, "seq_lens");
  const kvtuner::cuda::WindowWriteLaunch launch{
      kvtuner::window_write_params(key, value, ring_cache, ring_block_ids, query_start_loc, seq_lens,
                                   residual_length),
      key.size(0), ring_cache.size(0)};

  const c10::cuda::OptionalCUDAGuard guard(ring_cache.device());
  kvtuner::cuda::launch_write_window(launch, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
