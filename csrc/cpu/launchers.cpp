// Torch-facing side of the CPU ops: argument checks (launcher_args.h), then the kernels of
// packed_kernels.h in parallel. Work is handed out through an atomic counter (largest items
// first) because ragged batches make a static split of the items across threads unbalanced.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <atomic>

#include "cpu/packed_kernels.h"
#include "cpu/prefill_attention.h"
#include "launcher_args.h"
#include "ops.h"

namespace {

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

void check_cpu(const std::optional<torch::Tensor>& t, const char* name) {
  if (t.has_value()) check_cpu(*t, name);
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
                            const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& ring_cache,
                            const std::optional<torch::Tensor>& ring_block_ids,
                            const std::optional<torch::Tensor>& query_start_loc,
                            const std::optional<torch::Tensor>& seq_lens, int64_t key_bits, int64_t value_bits,
                            int64_t group_size, int64_t key_group_size, int64_t residual_length) {
  check_cpu(key, "key");
  check_cpu(value, "value");
  check_cpu(kv_cache, "kv_cache");
  check_cpu(slot_mapping, "slot_mapping");
  check_cpu(ring_cache, "ring_cache");
  check_cpu(ring_block_ids, "ring_block_ids");
  check_cpu(query_start_loc, "query_start_loc");
  check_cpu(seq_lens, "seq_lens");
  const kvtuner::CacheWriteParams params =
      kvtuner::cache_write_params(key, value, kv_cache, slot_mapping, ring_cache, ring_block_ids, query_start_loc,
                                  seq_lens, key_bits, value_bits, group_size, key_group_size, residual_length);
  // A token is (H_kv x D) quantizations: small enough that a grain of 16 tokens is fair.
  at::parallel_for(0, params.num_tokens, 16,
                   [&](int64_t begin, int64_t end) { kvtuner::cpu::write_tokens(params, begin, end); });
}

void paged_attention_cpu(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key,
                         const torch::Tensor& value, const torch::Tensor& kv_cache,
                         const std::optional<torch::Tensor>& ring_cache,
                         const std::optional<torch::Tensor>& ring_block_ids, const torch::Tensor& block_table,
                         const torch::Tensor& seq_lens, const torch::Tensor& query_start_loc, int64_t max_query_len,
                         int64_t max_seq_len, double scale, int64_t key_bits, int64_t value_bits, int64_t group_size,
                         int64_t key_group_size, int64_t residual_length, double softcap,
                         const std::optional<torch::Tensor>& workspace) {
  check_cpu(out, "out");
  check_cpu(query, "query");
  check_cpu(key, "key");
  check_cpu(value, "value");
  check_cpu(kv_cache, "kv_cache");
  check_cpu(ring_cache, "ring_cache");
  check_cpu(ring_block_ids, "ring_block_ids");
  check_cpu(block_table, "block_table");
  check_cpu(seq_lens, "seq_lens");
  check_cpu(query_start_loc, "query_start_loc");
  check_cpu(workspace, "workspace");
  const kvtuner::AttentionParams params = kvtuner::attention_params(
      out, query, key, value, kv_cache, ring_cache, ring_block_ids, block_table, seq_lens, query_start_loc,
      max_query_len, max_seq_len, scale, key_bits, value_bits, group_size, key_group_size, residual_length, softcap);

  kvtuner::cpu::AttentionPlan plan = kvtuner::cpu::plan_attention(params, at::get_num_threads());
  // Prefill route (cpu/prefill_attention.h): sequences with many query rows run on the matrix
  // units; the generic kernel keeps the others. One queue, the routed (largest) items first.
  const kvtuner::cpu::PrefillPlan prefill = kvtuner::cpu::plan_prefill(params, at::get_num_threads());
  kvtuner::cpu::drop_routed_sequences(prefill, plan.items);
  kvtuner::cpu::drop_routed_sequences(prefill, plan.reductions);
  const int64_t routed = int64_t(prefill.items.size());
  std::vector<float> partial(size_t(plan.partial_rows) * (params.head_size + 2));
  parallel_dynamic(routed + int64_t(plan.items.size()), [&](int64_t i) {
    if (i < routed) kvtuner::cpu::run_prefill_item(params, prefill, prefill.items[i]);
    else kvtuner::cpu::run_work_item(params, plan.items[i - routed], partial.data());
  });
  parallel_dynamic(int64_t(plan.reductions.size()),
                   [&](int64_t i) { kvtuner::cpu::reduce_partitions(params, plan.reductions[i], partial.data()); });
}

void write_window_cpu(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& ring_cache,
                      const torch::Tensor& ring_block_ids, const torch::Tensor& query_start_loc,
                      const torch::Tensor& seq_lens, int64_t residual_length) {
  check_cpu(key, "key");
  check_cpu(value, "value");
  check_cpu(ring_cache, "ring_cache");
  check_cpu(ring_block_ids, "ring_block_ids");
  check_cpu(query_start_loc, "query_start_loc");
  check_cpu(seq_lens, "seq_lens");
  const kvtuner::WindowWriteParams params = kvtuner::window_write_params(
      key, value, ring_cache, ring_block_ids, query_start_loc, seq_lens, residual_length);
  at::parallel_for(0, params.seqs.num_seqs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) kvtuner::cpu::write_window_sequence(params, int(seq));
  });
}
