// paged_attention's plan, the choice of the vector kernel's ISA and its working memory, and
// the merge of split-key partitions (attention.h). The kernel itself: attention_kernel.h.
#include "cpu/attention.h"

#include <vector>

#include "cpu/common/matrix_unit.h"
#include "cpu/common/simd.h"
#include "cpu/vector/attention_isa.h"

namespace kvtuner::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxRowsPerItem = 32;  // query rows (tokens x heads of a GQA group) of a short-query item
constexpr int kMinPartitionTokens = 256;

using ItemKernel = void (*)(const AttentionParams&, const WorkItem&, const ItemScratch&, float*);

// The widest vector kernel build this CPU runs (checked once; __builtin_cpu_supports includes the
// OS enabling the vector state), at most KVTUNER_CPU_ISA's (dispatch_env.h), so that the tests
// run every build on one machine.
VectorIsa choose_vector_isa() {
  const VectorIsa cap = cpu_isa_cap();
#if defined(__x86_64__) && !defined(__clang__)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("movbe");
  if (avx512 && cap == VectorIsa::kAvx512) return VectorIsa::kAvx512;
  if (avx2 && cap != VectorIsa::kBaseline) return VectorIsa::kAvx2;
#endif
  return VectorIsa::kBaseline;
}

ItemKernel item_kernel_of(VectorIsa isa) {
  switch (isa) {
    case VectorIsa::kAvx512: return run_work_item_avx512;
    case VectorIsa::kAvx2: return run_work_item_avx2;
    default: return run_work_item_baseline;
  }
}

ItemKernel item_kernel() {
  static const ItemKernel kernel = item_kernel_of(vector_isa());
  return kernel;
}

// The AMX decode kernel runs where the CPU and OS offer AMX and the AVX-512 vector kernel was
// chosen, unless KVTUNER_DECODE_ISA=off asks for the vector kernel (read at every plan, so that
// a benchmark can compare the two in one process).
bool decode_on_amx() {
  return decode_amx_allowed() && vector_isa() == VectorIsa::kAvx512 && detected_matrix_unit() == MatrixUnit::kAmx;
}

// Owns one thread's ItemScratch, grown to the largest item seen, and the tile orders of the
// last format it ran.
class ScratchBuffers {
 public:
  const ItemScratch& get(const AttentionParams& p, int rows, int chunk) {
    if (rows > rows_ || chunk > chunk_ || p.head_size > head_size_) {
      rows_ = std::max(rows, rows_);
      chunk_ = std::max(chunk, chunk_);
      head_size_ = std::max(p.head_size, head_size_);
      allocate();
    }
    fill_order(p.format.key_bits, p.head_size, key_order_);
    fill_order(p.format.value_bits, p.head_size, value_order_);
    view_.key_order = key_order_.position.data();
    view_.value_order = value_order_.position.data();
    return view_;
  }

 private:
  struct Order {
    int bits = 0, head_size = 0;
    std::vector<int> position;
  };

  static void fill_order(int bits, int head_size, Order& order) {
    if (order.bits == bits && order.head_size == head_size) return;
    order.bits = bits;
    order.head_size = head_size;
    order.position.resize(head_size);
    for (int c = 0; c < head_size; ++c) order.position[c] = tile_position(bits, head_size, c);
  }

  void allocate() {
    const size_t row_floats = size_t(rows_) * head_size_, chunk_floats = size_t(chunk_) * head_size_;
    floats_.assign(2 * row_floats + 2 * size_t(rows_) + 2 * chunk_floats + chunk_ + chunk_floats / 8 + kLanes +
                       4 * size_t(head_size_),
                   0.0f);
    ints_.assign(3 * size_t(rows_), 0);
    if (matrix_.empty()) {
      matrix_.assign(kDecodeWorkspaceBytes + 64, 0);
      view_.matrix = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(matrix_.data()) + 63) / 64 * 64);
    }
    float* f = floats_.data();
    auto take = [&f](size_t n) { float* p = f; f += n; return p; };
    view_.query = take(row_floats);
    view_.acc = take(row_floats);
    view_.max = take(rows_);
    view_.sum = take(rows_);
    view_.keys = take(chunk_floats);
    view_.values = take(chunk_floats);
    view_.scores = take(chunk_);
    view_.params = take(chunk_floats / 8 + kLanes);
    view_.channel_scale = take(head_size_);
    view_.channel_zero = take(head_size_);
    view_.row = take(2 * size_t(head_size_));
    int* i = ints_.data();
    auto take_ints = [&i](size_t n) { int* p = i; i += n; return p; };
    view_.packed_end = take_ints(rows_);
    view_.full_begin = take_ints(rows_);
    view_.full_end = take_ints(rows_);
  }

  int rows_ = 0, chunk_ = 0, head_size_ = 0;
  std::vector<float> floats_;
  std::vector<int> ints_;
  std::vector<uint8_t> matrix_;
  Order key_order_, value_order_;
  ItemScratch view_{};
};

}  // namespace

// Chosen on first use, which plan_attention makes on the calling thread (so that a bad
// KVTUNER_CPU_ISA raises there, not inside the parallel region).
VectorIsa vector_isa() {
  static const VectorIsa isa = choose_vector_isa();
  return isa;
}

// ---------------------------------------------------------------------------------------
// Plan
// ---------------------------------------------------------------------------------------

AttentionPlan plan_attention(const AttentionParams& p, int num_threads) {
  vector_isa();
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  struct Tile {
    int seq, query_begin, query_count, key_end;
    int64_t cost;
    bool long_query;
  };
  std::vector<Tile> tiles;
  int64_t total_cost = 0;
  for (int seq = 0; seq < p.seqs.num_seqs; ++seq) {
    const SequenceRows rows = sequence_rows(p.seqs, seq);
    const bool long_query = rows.rows >= kLongQueryTokens;
    const int tile_tokens = long_query ? kLongQueryTileTokens : std::max(1, kMaxRowsPerItem / heads_per_kv);
    for (int q = 0; q < rows.rows; q += tile_tokens) {
      const int count = std::min(tile_tokens, rows.rows - q);
      const int key_end = rows.first + q + count;  // one past the tile's last position
      const int64_t cost = int64_t(count) * heads_per_kv * (key_end - count / 2) + 64;
      tiles.push_back({seq, q, count, key_end, cost, long_query});
      total_cost += cost * p.num_kv_heads;
    }
  }
  // Split a short-query tile's keys into partitions when it alone would hold up the other
  // threads (decode of a few long sequences): aim at >= 4 items per thread.
  const int64_t target_cost = std::max<int64_t>(1, total_cost / (4 * int64_t(num_threads)));
  AttentionPlan plan;
  plan.amx_decode = decode_on_amx();
  for (const Tile& tile : tiles) {
    const int64_t wanted = (tile.cost + target_cost - 1) / target_cost;
    const int parts =
        tile.long_query ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(wanted, tile.key_end / kMinPartitionTokens)));
    const int part_keys = (tile.key_end + parts - 1) / parts;
    const int rows = tile.query_count * heads_per_kv;
    for (int kv_head = 0; kv_head < p.num_kv_heads; ++kv_head) {
      if (parts == 1) {
        plan.items.push_back(
            {tile.seq, kv_head, tile.query_begin, tile.query_count, 0, tile.key_end, -1, tile.cost, tile.long_query});
        continue;
      }
      plan.reductions.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, parts, plan.partial_rows});
      for (int part = 0; part < parts; ++part) {
        const int begin = part * part_keys;
        const int end = std::min(tile.key_end, begin + part_keys);
        plan.items.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, begin, end, plan.partial_rows,
                              int64_t(rows) * (end - begin) + 64, false});
        plan.partial_rows += rows;
      }
    }
  }
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return plan;
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

bool runs_on_amx_decode(const AttentionParams& p, const AttentionPlan& plan, const WorkItem& item) {
  return plan.amx_decode && decode_amx_takes(p, item.query_count * (p.num_q_heads / p.num_kv_heads));
}

void run_work_item(const AttentionParams& p, const AttentionPlan& plan, const WorkItem& item, float* partial) {
  const ItemKernel kernel = item_kernel();
  thread_local ScratchBuffers buffers;
  const int rows = item.query_count * (p.num_q_heads / p.num_kv_heads);
  const ItemScratch& scratch = buffers.get(p, rows, chunk_tokens(p.head_size));
  if (runs_on_amx_decode(p, plan, item)) {
    run_work_item_amx(p, item, scratch, partial);
  } else {
    kernel(p, item, scratch, partial);
  }
}

KVT_HOT void reduce_partitions(const AttentionParams& p, const ReduceItem& item, const float* partial) {
  const int head_size = p.head_size;
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const int rows = item.query_count * heads_per_kv;
  const int elem = elem_size(p.dtype);
  const SequenceRows seq = sequence_rows(p.seqs, item.seq);
  const int64_t slot_floats = head_size + 2;
  char* out = static_cast<char*>(p.out);
  float merged[kMaxHeadSize];
  for (int r = 0; r < rows; ++r) {
    float global_max = kNegInf;
    for (int part = 0; part < item.num_partitions; ++part) {
      global_max = std::max(global_max, partial[(item.partial_offset + int64_t(part) * rows + r) * slot_floats]);
    }
    float total = 0.0f;
    std::fill(merged, merged + head_size, 0.0f);
    for (int part = 0; part < item.num_partitions; ++part) {
      const float* slot = partial + (item.partial_offset + int64_t(part) * rows + r) * slot_floats;
      if (slot[0] == kNegInf) continue;  // partition outside this row's keys
      const float weight = exp_nonpositive(slot[0] - global_max);
      total += weight * slot[1];
      for (int d = 0; d < head_size; ++d) merged[d] += weight * slot[2 + d];
    }
    const int token = seq.start + item.query_begin + r / heads_per_kv;
    const int head = item.kv_head * heads_per_kv + r % heads_per_kv;
    store_row(merged, total > 0.0f ? 1.0f / total : 0.0f, p.dtype, head_size,
              out + (token * p.out_stride_token + head * p.out_stride_head) * elem);
  }
}

}  // namespace kvtuner::cpu
