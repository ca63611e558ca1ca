// The attention kernel for AVX2 CPUs (x86-64-v3: AVX2, FMA, F16C), portable vector code.
#include "cpu/vector/attention_isa.h"
#include "cpu/common/simd.h"

#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC target("avx2,avx,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe")
#define KVT_ISA_AVX2 1
#endif

#include "cpu/vector/attention_kernel.h"

namespace kvtuner::cpu {

void run_work_item_avx2(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                        float* partial) {
  run_item(params, item, scratch, partial);
}

}  // namespace kvtuner::cpu
