// paged_attention on the CPU, torch-free: a plan of work items over the batch, the vector
// kernel that runs an item, and the merge of split-key partitions. reference.paged_attention_ref
// is the definition: the query at position p reads key/value j < w0(p) from the packed pages
// and j >= w0(p) in the model dtype, from the ring (earlier steps) or the step's own rows.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/common/dispatch_env.h"
#include "cpu/common/work_plan.h"
#include "kernel_params.h"

namespace kvtuner::cpu {

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
