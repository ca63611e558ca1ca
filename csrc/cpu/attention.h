// paged_attention on the CPU, torch-free: a plan of work items over the batch, the vector
// kernel that runs an item, and the merge of split-key partitions. reference.paged_attention_ref
// is the definition: the query at position p reads key/value j < w0(p) from the packed pages
// and j >= w0(p) in the model dtype, from the ring (earlier steps) or the step's own rows.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/dispatch_env.h"
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

// The vector kernel's build: the widest the CPU runs within KVTUNER_CPU_ISA (dispatch_env.h),
// chosen by the first call (which raises a bad KVTUNER_CPU_ISA) for the whole process.
VectorIsa vector_isa();

AttentionPlan plan_attention(const AttentionParams& params, int num_threads);

// Whether `item` runs on the AMX decode kernel: the plan allows it and the kernel takes the item.
bool runs_on_amx_decode(const AttentionParams& params, const AttentionPlan& plan, const WorkItem& item);

// Runs one item with the AMX decode kernel where runs_on_amx_decode, else with the vector kernel;
// `partial` is the partial buffer (null when no item needs it).
void run_work_item(const AttentionParams& params, const AttentionPlan& plan, const WorkItem& item, float* partial);

void reduce_partitions(const AttentionParams& params, const ReduceItem& item, const float* partial);

}  // namespace kvtuner::cpu
