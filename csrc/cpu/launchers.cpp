// Torch-facing side of the CPU ops: argument checks, then the kernels of packed_kernels.h
// in parallel. Work is handed out through an atomic counter (largest items first) because
// ragged batches make a static split of the items across threads unbalanced.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <atomic>

#include "cpu/packed_kernels.h"
#include "launcher_checks.h"
#include "ops.h"

namespace {

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
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
  kvtuner::check_cache_write(key, value, kv_cache, slot_mapping, key_bits, value_bits, group_size);
  const int64_t heads = key.size(1), head_size = key.size(2);

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
  problem.dtype = kvtuner::elem_type(key, "key");
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
  kvtuner::check_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc, key_bits, value_bits,
                           group_size);
  const int64_t num_q_heads = query.size(1), head_size = query.size(2);
  const int64_t num_kv_heads = kv_cache.size(1), num_seqs = seq_lens.size(0);
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
  problem.dtype = kvtuner::elem_type(query, "query");

  const kvtuner::cpu::AttentionPlan plan = kvtuner::cpu::plan_attention(problem, at::get_num_threads());
  std::vector<float> partial(size_t(plan.partial_rows) * (head_size + 2));
  parallel_dynamic(int64_t(plan.items.size()),
                   [&](int64_t i) { kvtuner::cpu::run_work_item(problem, plan.items[i], partial.data()); });
  parallel_dynamic(int64_t(plan.reductions.size()),
                   [&](int64_t i) { kvtuner::cpu::reduce_partitions(problem, plan.reductions[i], partial.data()); });
}
