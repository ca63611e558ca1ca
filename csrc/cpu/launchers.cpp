// Torch-facing side of the CPU ops: argument checks (launcher_args.h, then the value checks
// below that read the index tensors), then the kernels of cache_write.h and attention.h in
// parallel. Attention items are handed out through an atomic counter (largest first) because
// ragged batches make a static split of the items across threads unbalanced.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <atomic>
#include <vector>

#include "cpu/attention.h"
#include "cpu/cache_write.h"
#include "cpu/common/matrix_unit.h"
#include "cpu/prefill/prefill_attention.h"
#include "cpu/route_counts.h"
#include "launcher_args.h"
#include "ops.h"

namespace {

using kvtuner::AttentionParams;
using kvtuner::RingArgs;
using kvtuner::SequenceArgs;

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

void check_cpu(const std::optional<torch::Tensor>& t, const char* name) {
  if (t.has_value()) check_cpu(*t, name);
}

// ---------------------------------------------------------------------------------------
// Value checks: cheap passes over the index tensors, so that a bad batch fails with a message
// instead of reading or writing outside the caches.
// ---------------------------------------------------------------------------------------

// Sequence s owns rows [query_start_loc[s], query_start_loc[s + 1]) of `num_rows`, at most seq_lens[s].
void check_sequences(const SequenceArgs& seqs, int64_t num_rows, const char* rows_name) {
  TORCH_CHECK(seqs.num_seqs == 0 || seqs.query_start_loc[0] >= 0, "query_start_loc[0] must be >= 0, got ",
              seqs.query_start_loc[0]);
  for (int s = 0; s < seqs.num_seqs; ++s) {
    const int rows = seqs.query_start_loc[s + 1] - seqs.query_start_loc[s];
    TORCH_CHECK(rows >= 0, "query_start_loc must not decrease: sequence ", s, " has ", rows, " rows");
    TORCH_CHECK(rows <= seqs.seq_lens[s], "sequence ", s, " has ", rows, " query rows but seq_len ", seqs.seq_lens[s],
                " (query_len must be <= seq_len)");
  }
  TORCH_CHECK(seqs.query_start_loc[seqs.num_seqs] <= num_rows, "query_start_loc ends at ",
              seqs.query_start_loc[seqs.num_seqs], " but ", rows_name, " has only ", num_rows, " rows");
}

void check_ring_ids(const RingArgs& ring, int num_seqs, int64_t num_ring_blocks) {
  for (int s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(ring.block_ids[s] >= 0 && ring.block_ids[s] < num_ring_blocks, "ring_block_ids[", s, "] = ",
                ring.block_ids[s], " lies outside the ring cache's ", num_ring_blocks, " blocks");
  }
}

int64_t num_ring_blocks(const std::optional<torch::Tensor>& ring_cache) {
  return ring_cache.has_value() ? ring_cache->size(0) : 0;
}

void check_slots(const int64_t* slots, int64_t num_slots, int64_t num_blocks, int64_t block_size) {
  const int64_t capacity = num_blocks * block_size;
  for (int64_t i = 0; i < num_slots; ++i) {
    TORCH_CHECK(slots[i] < capacity, "slot_mapping[", i, "] = ", slots[i], " lies outside the cache's ", capacity,
                " slots (", num_blocks, " blocks of ", block_size, ")");
  }
}

// The block table entries each sequence reads: ceil(seq_len / block_size) of them, within the cache.
void check_block_table(const AttentionParams& p, const torch::Tensor& block_table, int64_t num_blocks) {
  const int64_t max_blocks = block_table.size(1);
  for (int s = 0; s < p.seqs.num_seqs; ++s) {
    const int64_t used = (int64_t(p.seqs.seq_lens[s]) + p.block_size - 1) / p.block_size;
    TORCH_CHECK(used <= max_blocks, "sequence ", s, " of ", p.seqs.seq_lens[s], " tokens needs ", used,
                " blocks, the block table has ", max_blocks, " per sequence");
    const int32_t* row = p.block_table + s * p.block_table_stride;
    for (int64_t b = 0; b < used; ++b) {
      TORCH_CHECK(row[b] >= 0 && row[b] < num_blocks, "block_table[", s, ", ", b, "] = ", row[b],
                  " lies outside the cache's ", num_blocks, " blocks");
    }
  }
}

// ---------------------------------------------------------------------------------------
// Running the kernels
// ---------------------------------------------------------------------------------------

// Runs body(i) for i in [0, n) on all threads, in the caller's order (largest first).
template <typename Body>
void parallel_dynamic(int64_t n, const Body& body) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i);
  });
}

// The split-key partial buffer: the caller's workspace when it is large enough, else our own.
float* partial_buffer(const std::optional<torch::Tensor>& workspace, int64_t floats, std::vector<float>& own) {
  if (floats == 0) return nullptr;
  if (workspace.has_value() && workspace->is_contiguous() && workspace->nbytes() >= size_t(floats) * sizeof(float) &&
      reinterpret_cast<uintptr_t>(workspace->data_ptr()) % alignof(float) == 0) {
    return static_cast<float*>(workspace->data_ptr());
  }
  own.resize(size_t(floats));
  return own.data();
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
  check_slots(params.slot_mapping, params.num_tokens, kv_cache.size(0), params.block_size);
  const bool kivi_keys = params.seqs.seq_lens != nullptr;  // set by cache_write_params for kivi keys only
  if (kivi_keys) {
    check_sequences(params.seqs, params.num_tokens, "slot_mapping");
    check_ring_ids(params.ring, params.seqs.num_seqs, num_ring_blocks(ring_cache));
  }
  // A token is (H_kv x D) quantizations: small enough that a grain of 16 tokens is fair.
  at::parallel_for(0, params.num_tokens, 16,
                   [&](int64_t begin, int64_t end) { kvtuner::cpu::write_tokens(params, begin, end); });
  if (kivi_keys) {
    const int64_t heads = params.num_kv_heads;
    at::parallel_for(0, params.seqs.num_seqs * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) kvtuner::cpu::write_kivi_groups(params, int(i / heads), int(i % heads));
    });
  }
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
  const AttentionParams params = kvtuner::attention_params(
      out, query, key, value, kv_cache, ring_cache, ring_block_ids, block_table, seq_lens, query_start_loc,
      max_query_len, max_seq_len, scale, key_bits, value_bits, group_size, key_group_size, residual_length, softcap);
  check_sequences(params.seqs, query.size(0), "query");
  check_block_table(params, block_table, kv_cache.size(0));
  if (params.format.residual_length > 0) check_ring_ids(params.ring, params.seqs.num_seqs, num_ring_blocks(ring_cache));

  kvtuner::cpu::AttentionPlan plan = kvtuner::cpu::plan_attention(params, at::get_num_threads());
  // Prefill route (cpu/prefill/prefill_attention.h): sequences with many query rows run on the
  // matrix units where the CPU has them, taken out of `plan`; one queue, routed items first.
  const kvtuner::cpu::PrefillPlan prefill = kvtuner::cpu::plan_prefill(params, at::get_num_threads(), plan);
  kvtuner::cpu::count_routes(params, plan, prefill);
  const int64_t routed = int64_t(prefill.items.size());
  std::vector<float> own_partial;
  float* partial = partial_buffer(workspace, plan.partial_rows * (params.head_size + 2), own_partial);
  parallel_dynamic(routed + int64_t(plan.items.size()), [&](int64_t i) {
    if (i < routed) kvtuner::cpu::run_prefill_item(params, prefill, prefill.items[i], partial);
    else kvtuner::cpu::run_work_item(params, plan, plan.items[i - routed], partial);
  });
  parallel_dynamic(int64_t(plan.reductions.size()),
                   [&](int64_t i) { kvtuner::cpu::reduce_partitions(params, plan.reductions[i], partial); });
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
  check_sequences(params.seqs, key.size(0), "key");
  check_ring_ids(params.ring, params.seqs.num_seqs, ring_cache.size(0));
  at::parallel_for(0, params.seqs.num_seqs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) kvtuner::cpu::write_window_sequence(params, int(seq));
  });
}

std::tuple<c10::Dict<std::string, int64_t>, c10::Dict<std::string, int64_t>, std::string, std::string>
cpu_route_counts() {
  using kvtuner::cpu::Route;
  const kvtuner::cpu::RouteCounts counts = kvtuner::cpu::route_counts();
  c10::Dict<std::string, int64_t> items, sequences;
  for (int r = 0; r < kvtuner::cpu::kRoutes; ++r) {
    const char* name = kvtuner::cpu::route_name(Route(r));
    items.insert(name, counts.items[r]);
    sequences.insert(name, counts.sequences[r]);
  }
  return {items, sequences, kvtuner::cpu::vector_isa_name(kvtuner::cpu::vector_isa()),
          kvtuner::cpu::matrix_unit_name(kvtuner::cpu::detected_matrix_unit())};
}

void reset_cpu_route_counts() { kvtuner::cpu::reset_route_counts(); }
