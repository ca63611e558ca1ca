// The attention kernel for AVX-512 CPUs (x86-64-v4: F, BW, DQ, VL, CD), with intrinsics for the
// byte and fp16 conversions (simd_isa.h). attention.cpp calls it when the CPU has them.
#include "cpu/vector/attention_isa.h"
#include "cpu/common/simd.h"

#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,avx,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#pragma GCC target("prefer-vector-width=512")
#define KVT_ISA_AVX512 1
#endif

#include "cpu/vector/attention_kernel.h"

namespace kvtuner::cpu {

void run_work_item_avx512(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                          float* partial) {
  run_item(params, item, scratch, partial);
}

}  // namespace kvtuner::cpu
