// What paged_attention ran on the CPU: work items and sequences per route, counted since the
// last reset, so that a test can assert the route a call took instead of inferring it from its
// numbers (torch.ops.kvtuner.cpu_route_counts). One count per route and call, made while the
// call is planned: relaxed atomics, safe from any thread; calls that overlap a reset may be
// counted in part. Torch-free.
#pragma once

#include <cstdint>

#include "cpu/attention.h"
#include "cpu/prefill/prefill_attention.h"

namespace kvtuner::cpu {

// The vector kernel (whose build is vector_isa()), the AMX decode kernel, the prefill kernel
// on AVX512-BF16 dot products or on AMX.
enum class Route : int { kVector, kAmxDecode, kPrefillAvx512Bf16, kPrefillAmx };
constexpr int kRoutes = 4;

const char* route_name(Route route);  // "vector", "amx_decode", "prefill_avx512_bf16", "prefill_amx"

struct RouteCounts {
  int64_t items[kRoutes];      // work items
  int64_t sequences[kRoutes];  // sequences with at least one item on the route (once per call)
};

// Adds the items of one call's plans (the prefill route's and the rest) to the counts.
void count_routes(const AttentionParams& params, const AttentionPlan& plan, const PrefillPlan& prefill);

RouteCounts route_counts();
void reset_route_counts();

}  // namespace kvtuner::cpu
