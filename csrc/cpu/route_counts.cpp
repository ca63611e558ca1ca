// route_counts.h: the counters and the route of each planned item.
#include "cpu/route_counts.h"

#include <atomic>
#include <vector>

namespace kvtuner::cpu {
namespace {

std::atomic<int64_t> g_items[kRoutes];
std::atomic<int64_t> g_sequences[kRoutes];

Route prefill_route(const PrefillPlan& prefill) {
  return prefill.unit == MatrixUnit::kAmx ? Route::kPrefillAmx : Route::kPrefillAvx512Bf16;
}

}  // namespace

const char* route_name(Route route) {
  switch (route) {
    case Route::kVector: return "vector";
    case Route::kAmxDecode: return "amx_decode";
    case Route::kPrefillAvx512Bf16: return "prefill_avx512_bf16";
    default: return "prefill_amx";
  }
}

void count_routes(const AttentionParams& p, const AttentionPlan& plan, const PrefillPlan& prefill) {
  int64_t items[kRoutes] = {};
  std::vector<uint8_t> routes_of_seq(size_t(p.seqs.num_seqs), 0);  // bit r: the sequence has an item on route r
  auto add = [&](Route route, int seq) {
    ++items[int(route)];
    routes_of_seq[size_t(seq)] |= uint8_t(1u << int(route));
  };
  for (const PrefillItem& item : prefill.items) add(prefill_route(prefill), item.seq);
  for (const WorkItem& item : plan.items) {
    add(runs_on_amx_decode(p, plan, item) ? Route::kAmxDecode : Route::kVector, item.seq);
  }
  for (int r = 0; r < kRoutes; ++r) {
    int64_t sequences = 0;
    for (const uint8_t routes : routes_of_seq) sequences += (routes >> r) & 1;
    if (items[r] > 0) g_items[r].fetch_add(items[r], std::memory_order_relaxed);
    if (sequences > 0) g_sequences[r].fetch_add(sequences, std::memory_order_relaxed);
  }
}

RouteCounts route_counts() {
  RouteCounts counts;
  for (int r = 0; r < kRoutes; ++r) {
    counts.items[r] = g_items[r].load(std::memory_order_relaxed);
    counts.sequences[r] = g_sequences[r].load(std::memory_order_relaxed);
  }
  return counts;
}

void reset_route_counts() {
  for (int r = 0; r < kRoutes; ++r) {
    g_items[r].store(0, std::memory_order_relaxed);
    g_sequences[r].store(0, std::memory_order_relaxed);
  }
}

}  // namespace kvtuner::cpu
