// What a paged_attention call is cut into on the CPU: work items, the merges of split-key
// partitions, and the plan that holds them. Below every unit that plans (attention.cpp, the
// prefill route) and every kernel that runs an item (vector/, amx/), so that none of them
// includes another's header to reach these types. Torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_params.h"

namespace kvtuner::cpu {

using ::kvtuner::AttentionParams;

// One unit of parallel work: query tokens [query_begin, query_begin + query_count) of one
// sequence (indices among its rows), all the query heads of one KV head, over key positions
// [key_begin, key_end). An item whose key range is one partition of a longer range writes a
// partial result (running max, sum and unscaled accumulator per query row, in that order:
// head_size + 2 floats) that `reduce_partitions` merges.
struct WorkItem {
  int seq, kv_head, query_begin, query_count;
  int key_begin, key_end;
  int64_t partial_offset;  // first partial row (query rows token-major, heads minor); -1: write out
  int64_t cost;            // rough work, for scheduling the largest items first
  bool long_query;         // a tile of kLongQueryTileTokens tokens of a long query chunk (keys never split)
};

// Items whose partitions must be merged: `num_partitions` consecutive partial slots.
struct ReduceItem {
  int seq, kv_head, query_begin, query_count, num_partitions;
  int64_t partial_offset;
};

struct AttentionPlan {
  std::vector<WorkItem> items;  // sorted by decreasing cost
  bool amx_decode = false;      // items the AMX decode kernel takes run there (attention_isa.h)
  std::vector<ReduceItem> reductions;
  int64_t partial_rows = 0;  // rows of (head_size + 2) floats the partial buffer needs
};

// Sequences with at least this many query rows are tiled into long-query items.
constexpr int kLongQueryTokens = 64;
// Query tokens per long-query item: more rows share each dequantized key chunk, and such a
// sequence yields enough items without splitting its keys.
constexpr int kLongQueryTileTokens = 64;

}  // namespace kvtuner::cpu
