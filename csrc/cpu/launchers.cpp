// Torch-facing side of the CPU ops: argument checks, then the kernels of packed_kernels.h
// in parallel. Work is handed out through an atomic counter (largest items first) because
// ragged batches make a static split of the items across threads unbalanced.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <atomic>

#include "cpu/packed_kernels.h"
#include "ops.h"

namespace {

using kvtuner::cpu::ElemType;

ElemType elem_type(const torch::Tensor& t, const char* name) {
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

void check_format(int64_t head_size, int64_t group_size, int64_t key_bits, int64_t value_bits) {
  check_bits(key_bits, "key_bits");
  check_bits(value_bits, "value_bits");
  TORCH_CHECK(head_size % 16 == 0 && head_size <= 256, "head size must be a multiple of 16 and at most 256, got ",
              head_size);
  TORCH_CHECK(group_size == head_size || (group_size % 32 == 0 && group_size > 0 && head_size % group_size == 0),
              "group_size ", group_size, " must divide the head size ", head_size,
              " (32, 64, 128 or the head size)");
}

// The cache is uint8[num_blocks, H_kv, block_size, C], each (block, head) plane contiguous.
void check_cache(const torch::Tensor& cache, int64_t num_kv_heads, int64_t bytes_per_token) {
  TORCH_CHECK(cache.scalar_type() == at::kByte, "kv_cache must be uint8, got ", cache.scalar_type());
  TORCH_CHECK(cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, C], got ", cache.sizes());
  TORCH_CHECK(cache.size(1) == num_kv_heads, "kv_cache has ", cache.size(1), " KV heads, the inputs ", num_kv_heads);
  TORCH_CHECK(cache.size(3) == bytes_per_token, "kv_cache holds ", cache.size(3),
              " bytes per token, the format needs ", bytes_per_token, " (format.LayerFormat.bytes_per_token)");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == bytes_per_token,
              "each (block, head) plane of kv_cache must be contiguous, strides are ", cache.strides());
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

void check_int32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

// Runs body(i) for i in [0, n) on all threads, largest-first order given by the caller.
template <typename Body>
void parallel_dynamic(int64_t n, const Body& body) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i);
  });
}

}  // namespace

void quantize_and_cache_cpu(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                            const torch::Tensor& slot_mapping, int64_t key_bits, int64_t value_bits,
                            int64_t group_size) {
  check_cpu(key, "key");
  check_cpu(value, "value");
  check_cpu(kv_cache, "kv_cache");
  check_cpu(slot_mapping, "slot_mapping");
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

  kvtuner::cpu::CacheWriteProblem problem{};
  problem.key = key.data_ptr();
  problem.value = value.data_ptr();
  problem.key_stride_token = key.stride(0);
  problem.key_stride_head = key.stride(1);
  problem.value_stride_token = value.stride(0);
  problem.value_stride_head = value.stride(1);
  problem.cache = kv_cache.data_ptr<uint8_t>();
  problem.cache_stride_block = kv_cache.stride(0);
  problem.cache_stride_head = kv_cache.stride(1);
  problem.slot_mapping = slot_mapping.data_ptr<int64_t>();
  problem.num_tokens = slot_mapping.size(0);
  problem.num_kv_heads = int(heads);
  problem.head_size = int(head_size);
  problem.block_size = int(kv_cache.size(2));
  problem.group_size = int(group_size);
  problem.key_bits = int(key_bits);
  problem.value_bits = int(value_bits);
  problem.dtype = dtype;
  // A token is (H_kv x D) quantizations: small enough that a grain of 16 tokens is fair.
  at::parallel_for(0, problem.num_tokens, 16,
                   [&](int64_t begin, int64_t end) { kvtuner::cpu::write_tokens(problem, begin, end); });
}

void paged_attention_cpu(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& kv_cache,
                         const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                         const torch::Tensor& query_start_loc, int64_t max_query_len, int64_t max_seq_len,
                         double scale, int64_t key_bits, int64_t value_bits, int64_t group_size,
                         int64_t sliding_window, double softcap) {
  check_cpu(out, "out");
  check_cpu(query, "query");
  check_cpu(kv_cache, "kv_cache");
  check_cpu(block_table, "block_table");
  check_cpu(seq_lens, "seq_lens");
  check_cpu(query_start_loc, "query_start_loc");
  TORCH_CHECK(query.dim() == 3, "query must be [T, H_q, D], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(),
              "out must match query's shape and dtype, got ", out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query and out must be contiguous along the head dim");
  const ElemType dtype = elem_type(query, "query");
  const int64_t num_q_heads = query.size(1), head_size = query.size(2);
  check_format(head_size, group_size, key_bits, value_bits);
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
  (void)max_query_len;  // the plan reads the exact lengths; the bounds serve the CUDA launcher
  (void)max_seq_len;

  kvtuner::cpu::AttentionProblem problem{};
  problem.query = query.data_ptr();
  problem.query_stride_token = query.stride(0);
  problem.query_stride_head = query.stride(1);
  problem.out = out.data_ptr();
  problem.out_stride_token = out.stride(0);
  problem.out_stride_head = out.stride(1);
  problem.cache = kv_cache.data_ptr<uint8_t>();
  problem.cache_stride_block = kv_cache.stride(0);
  problem.cache_stride_head = kv_cache.stride(1);
  problem.block_table = block_table.data_ptr<int32_t>();
  problem.block_table_stride = block_table.stride(0);
  problem.seq_lens = seq_lens.data_ptr<int32_t>();
  problem.query_start_loc = query_start_loc.data_ptr<int32_t>();
  problem.num_seqs = int(num_seqs);
  problem.num_q_heads = int(num_q_heads);
  problem.num_kv_heads = int(num_kv_heads);
  problem.head_size = int(head_size);
  problem.block_size = int(kv_cache.size(2));
  problem.group_size = int(group_size);
  problem.key_bits = int(key_bits);
  problem.value_bits = int(value_bits);
  problem.sliding_window = int(sliding_window);
  problem.scale = float(scale);
  problem.softcap = float(softcap);
  problem.dtype = dtype;

  const kvtuner::cpu::AttentionPlan plan = kvtuner::cpu::plan_attention(problem, at::get_num_threads());
  std::vector<float> partial(size_t(plan.partial_rows) * (head_size + 2));
  parallel_dynamic(int64_t(plan.items.size()),
                   [&](int64_t i) { kvtuner::cpu::run_work_item(problem, plan.items[i], partial.data()); });
  parallel_dynamic(int64_t(plan.reductions.size()),
                   [&](int64_t i) { kvtuner::cpu::reduce_partitions(problem, plan.reductions[i], partial.data()); });
}
