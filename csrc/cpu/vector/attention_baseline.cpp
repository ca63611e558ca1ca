// The attention kernel for any CPU the build targets (x86-64: SSE2), portable vector code.
#include "cpu/vector/attention_kernel.h"

namespace kvtuner::cpu {

void run_work_item_baseline(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                            float* partial) {
  run_item(params, item, scratch, partial);
}

}  // namespace kvtuner::cpu
