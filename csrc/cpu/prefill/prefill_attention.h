// Prefill attention on the CPU's matrix units: the sequences of a step with many query rows
// (prefill, chunked prefill) computed as tiles of Q.K^T and P.V on AMX (or AVX512-BF16
// dot products), with the exact v2 semantics of reference.paged_attention_ref: keys and values
// older than the full-precision window come from the packed pages, dequantized tile by tile
// into a small workspace; the window (the ring and the step's own rows) is read in the model
// dtype; both are merged by one online softmax. Free of torch headers.
//
// Routing: `plan_prefill` picks the sequences this kernel takes (model dtype bfloat16, head size
// a multiple of 32 up to 256, a CPU with AVX512-BF16, and at least kMinPrefillRows query rows
// per KV head); the vector kernel (attention.h) keeps the rest. Environment overrides, for
// tests and tuning (dispatch_env.h): KVTUNER_PREFILL_ISA caps the unit ("avx512_bf16": dot
// products even where AMX exists; "off": no route), KVTUNER_PREFILL_MIN_ROWS sets the threshold.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/common/dispatch_env.h"
#include "cpu/common/work_plan.h"
#include "kernel_params.h"

namespace kvtuner::cpu {

// Query rows (query tokens x query heads of one KV head) from which a sequence is routed here:
// prefill and chunks, where the matrix products pay for their tiling; decodes and short
// speculative steps stay with the vector kernel (and the AMX decode kernel). The threshold is
// conservative: this kernel also wins on a few rows (python -m benchmarks.kernels.attention_steps
// compares the routes), so it is to revisit together with a decode path of its own.
constexpr int kMinPrefillRows = 16;

// One unit of parallel work: query tokens [query_begin, query_begin + query_count) of one
// sequence (indices within its query rows), all query heads of one KV head, over the keys in
// [key_begin, key_end) the rows see. Items that split a long key range into partitions write
// partial rows in the vector kernel's layout (attention.h: max, sum, accumulator per row),
// merged by its reduce_partitions.
struct PrefillItem {
  int seq, kv_head, query_begin, query_count;
  int key_begin, key_end;
  int64_t partial_offset;  // first partial row; -1: write the output
  int64_t cost;            // rows x keys, for scheduling the largest items first
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

// Plans the sequences routed here and takes them over from the vector kernel's plan: their
// items leave `vector_plan`, the merges of their key partitions join its reductions and their
// partial rows its partial buffer (after its own).
PrefillPlan plan_prefill(const AttentionParams& params, int num_threads, AttentionPlan& vector_plan);

// `partial`: the partial buffer of `vector_plan` (null when no item needs it).
void run_prefill_item(const AttentionParams& params, const PrefillPlan& plan, const PrefillItem& item,
                      float* partial);

}  // namespace kvtuner::cpu
