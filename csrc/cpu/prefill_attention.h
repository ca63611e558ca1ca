// Prefill attention on the CPU's matrix units: the sequences of a step with many query rows
// (prefill, chunked prefill) computed as tiles of Q.K^T and P.V on AMX (or AVX512-BF16
// dot products), with the exact v2 semantics of format.paged_attention_ref: keys and values
// older than the full-precision window come from the packed pages, dequantized tile by tile
// into a small workspace; the window (the ring and the step's own rows) is read in the model
// dtype; both are merged by one online softmax. Free of torch headers.
//
// Routing: `plan_prefill` picks the sequences this kernel takes (model dtype bfloat16, a head
// size and block size the tiles support, a CPU with AVX512-BF16, and at least
// kMinPrefillRows query rows per KV head); the vector kernel (attention.h) keeps the
// rest. Environment overrides, for tests and tuning:
//   KVTUNER_PREFILL_ISA       "amx", "avx512_bf16" (dot products even where AMX exists) or
//                             "off"; unset: the best the CPU has
//   KVTUNER_PREFILL_MIN_ROWS  the routing threshold in query rows per KV head
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernel_params.h"

namespace kvtuner::cpu {

// What computes the matrix products (each tier also needs everything of the tier below).
enum class MatrixUnit : int { kNone, kAvx512Bf16, kAmx };

// The best unit this CPU and OS offer (AMX needs the kernel's permission for tile data,
// requested once), lowered by KVTUNER_PREFILL_ISA when set.
MatrixUnit prefill_matrix_unit();

// Query rows (query tokens x query heads of one KV head) from which a sequence is routed here:
// below it the vector kernel's dot products cost less than filling the tiles.
constexpr int kMinPrefillRows = 16;

// One unit of parallel work: query tokens [query_begin, query_begin + query_count) of one
// sequence (indices within its query rows), all query heads of one KV head, over every key
// the rows see.
struct PrefillItem {
  int seq, kv_head, query_begin, query_count;
  int64_t cost;  // rows x keys, for scheduling the largest items first
};

// Key tiles from the pages that several items of a sequence read (whole 128-position tiles
// below every window): dequantized once, by the first item that needs one, into storage the
// plan owns (per thread that plans, reused across calls).
struct SharedTiles {
  std::vector<int> first;   // per sequence: index of its first tile (KV head h: + h x count[seq])
  std::vector<int> count;   // per sequence and KV head; 0: the sequence's items fill their own
  int64_t tile_bytes = 0;   // bytes of one tile (keys then values, prefill_attention.cpp)
  char* data = nullptr;
  std::unique_ptr<std::atomic<uint8_t>[]> state;  // per tile: 0 empty, 1 being filled, 2 ready
};

struct PrefillPlan {
  MatrixUnit unit = MatrixUnit::kNone;
  std::vector<PrefillItem> items;  // sorted by decreasing cost
  std::vector<uint8_t> routed;     // per sequence: 1 when its rows are computed here
  SharedTiles shared;

  bool routes(int seq) const { return !routed.empty() && routed[seq] != 0; }
};

PrefillPlan plan_prefill(const AttentionParams& params, int num_threads);

void run_prefill_item(const AttentionParams& params, const PrefillPlan& plan, const PrefillItem& item);

// Removes the items of routed sequences from another kernel's work list (anything with a `seq`).
template <typename Items>
void drop_routed_sequences(const PrefillPlan& plan, Items& items) {
  if (plan.items.empty()) return;
  std::size_t kept = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (!plan.routes(items[i].seq)) items[kept++] = items[i];
  }
  items.resize(kept);
}

}  // namespace kvtuner::cpu
