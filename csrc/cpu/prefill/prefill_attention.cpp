// Prefill attention on matrix units (prefill_attention.h). Three parts:
//   1. which matrix unit the CPU offers (default target code, safe on any x86-64);
//   2. the kernel: one work item = query rows of one (sequence, KV head) against all the keys
//      they see, tile by tile (compiled for AVX-512 + BF16, run only where the CPU has them);
//   3. the plan and the entry points (default target).
//
// Per key tile (up to kMaxKeyTile positions) the item
//   a. fills a packed tile (positions some row reads from the pages, dequantized to bf16) and
//      a full-precision tile (positions some row reads in the model dtype: the ring before the
//      step's first position, the step's own key/value rows from it on), zeros elsewhere;
//   b. computes S = Q.K^T against each tile it filled, on the matrix unit;
//   c. picks per row and key the score the v2 rule reads (j < w0(p): packed, w0(p) <= j <= p:
//      full precision, else masked), updates the row's online softmax (see raise_max) and splits
//      the bf16 probabilities by source;
//   d. accumulates P_packed.V_packed + P_full.V_full into the fp32 accumulator.
// Tiles that every row reads from one source with no causal cut (the bulk of a long prefill)
// skip the masks; whole packed tiles that several items of a sequence read are filled once
// (SharedTiles in prefill_attention.h).
#include "cpu/prefill/prefill_attention.h"

#include "cpu/common/matrix_unit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVT_PREFILL_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(KVT_PREFILL_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kvtuner::cpu {

// ---------------------------------------------------------------------------------------
// 1. The matrix unit
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Per-thread workspace (allocated by default-target code, used by the kernel)
// ---------------------------------------------------------------------------------------

namespace {

constexpr int kMaxKeyTile = 128;   // must match prefill::kMaxKeyTile (prefill_matmul.h)
constexpr int kMaxItemRows = 384;  // query rows per work item (tokens x query heads of a KV head)
constexpr int kRowAlignment = 16;  // rows of one AMX tile
// Rows whose scores and probabilities are computed at a time (the scores buffers' size). Per
// group, the products skip the keys no row of the group reads from a source (diagonal tiles).
constexpr int kGroupRows = 128;

// The matrix operands are tiled (prefill_matmul.h); the shapes below are their logical ones.
struct Workspace {
  uint16_t* query;          // [rows][2D] bf16: each row twice, for split keys (prefill_tiles.h)
  float* scores_packed;     // [kGroupRows][kMaxKeyTile]: one row group's scores
  float* scores_full;
  uint16_t* probs_packed;   // [kGroupRows][kMaxKeyTile] bf16
  uint16_t* probs_full;
  float* acc;               // [rows][D]
  float* row_max;           // [rows]: the reference max of the online softmax, in raw score units
  float* row_limit;         // [rows]: scores above it move the reference (see raise_max)
  float* row_sum;           // [rows][16]: the softmax denominator, as lanes summed at the end
  int* position;            // [rows]: the row's query position
  int* window;              // [rows]: w0(position)
  uint16_t* key_rows;       // [kMaxKeyTile][2D] bf16 staging
  uint16_t* value_rows;     // [kMaxKeyTile][D]
  uint32_t* keys_packed;    // [D][kMaxKeyTile] VNNI words (split: hi pairs, then lo pairs)
  uint32_t* keys_full;      // [D/2][kMaxKeyTile]
  uint32_t* values_packed;  // [kMaxKeyTile/2][D] VNNI words
  uint32_t* values_full;
  float* channel_scale;     // [D]: one kivi key group's params
  float* channel_zero;
};

// Hands out consecutive 64-byte aligned arrays from `at` on.
struct Carver {
  uintptr_t at;

  template <typename T>
  T* take(size_t count) {
    at = (at + 63) / 64 * 64;
    T* array = reinterpret_cast<T*>(at);
    at += count * sizeof(T);
    return array;
  }
};

// The workspace's arrays from `base` on; `*end` receives the address past the last one.
Workspace lay_out(uintptr_t base, int rows, int head_size, uintptr_t* end) {
  const size_t r = size_t(rows), d = size_t(head_size), n = size_t(kMaxKeyTile), g = size_t(kGroupRows);
  Carver c{base};
  Workspace w;
  w.query = c.take<uint16_t>(r * 2 * d);
  w.scores_packed = c.take<float>(g * n);
  w.scores_full = c.take<float>(g * n);
  w.probs_packed = c.take<uint16_t>(g * n);
  w.probs_full = c.take<uint16_t>(g * n);
  w.acc = c.take<float>(r * d);
  w.row_max = c.take<float>(r);
  w.row_limit = c.take<float>(r);
  w.row_sum = c.take<float>(r * 16);
  w.position = c.take<int>(r);
  w.window = c.take<int>(r);
  w.key_rows = c.take<uint16_t>(n * 2 * d);
  w.value_rows = c.take<uint16_t>(n * d);
  w.keys_packed = c.take<uint32_t>(n * d);
  w.keys_full = c.take<uint32_t>(n * d / 2);
  w.values_packed = c.take<uint32_t>(n * d / 2);
  w.values_full = c.take<uint32_t>(n * d / 2);
  w.channel_scale = c.take<float>(d);
  w.channel_zero = c.take<float>(d);
  *end = c.at;
  return w;
}

// The calling thread's workspace, grown as needed.
Workspace thread_workspace(int rows, int head_size) {
  thread_local std::vector<char> storage;
  uintptr_t size;
  lay_out(0, rows, head_size, &size);
  if (storage.size() < size + 64) storage.resize(size + 64);
  return lay_out(reinterpret_cast<uintptr_t>(storage.data()), rows, head_size, &size);
}

}  // namespace
}  // namespace kvtuner::cpu

// ---------------------------------------------------------------------------------------
// 2. The kernel (AVX-512 + BF16; AMX through inline assembly)
// ---------------------------------------------------------------------------------------

#if defined(KVT_PREFILL_X86)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
// GCC 12 reports the _mm512_undefined_*() placeholders inside its own intrinsics as maybe
// uninitialized once they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define KVT_PREFILL_TARGET_REGION 1

#include "cpu/common/exp2_avx512.h"
#include "cpu/prefill/prefill_matmul.h"
#include "cpu/prefill/prefill_tiles.h"

namespace kvtuner::cpu::prefill {
namespace {

static_assert(kMaxKeyTile == ::kvtuner::cpu::kMaxKeyTile, "one key tile size");
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;

// Probabilities enter the row sum as the bf16 values the unit multiplies (one dot product with
// ones adds a pair per lane), so the output is an exact weighted mean of the tile's values.
inline __m512 add_pairs(__m512 sum, __m512i bf16) {
  return _mm512_dpbf16_ps(sum, (__m512bh)bf16, (__m512bh)_mm512_set1_epi16(0x3f80));
}

struct Item {
  const AttentionParams& p;
  const Workspace& w;
  const PrefillPlan& plan;
  MatrixUnit unit;
  int head_size, kv_head, heads_per_kv;
  int rows, padded_rows;
  int query_depth;      // channels per query row: 2D (each row twice, for split keys)
  int packed_depth;     // channels of a packed key row: 2D when split, D for 16-bit keys
  int seq_first_row;    // the sequence's first row in query/key/value/out
  int first_position;   // position of the sequence's first row this step
  const int32_t* blocks;
  const uint16_t* ring_plane;  // this sequence's ring plane of this KV head; null without a window
  float scale_log2;            // softmax scale x log2(e): probabilities are 2^(s x scale_log2 - max)
};

// The online softmax keeps a reference max m per row and computes p = 2^((s - m) x scale_log2).
// m need not be the exact running max: it moves only when a score exceeds it by more than
// kMaxHeadroom (in log2 units), so p stays below 2^kMaxHeadroom (harmless in fp32 and bf16,
// whose relative precision does not depend on magnitude) and the branch below is almost never
// taken after a row's first tile; each move rescales the row's sum and accumulator.
constexpr float kMaxHeadroom = 8.0f;

inline void raise_max(const Item& it, int r, float tile_max) {
  float& row_max = it.w.row_max[r];
  if (row_max != kNegInf) {
    const __m512 correction = _mm512_set1_ps(std::exp2((row_max - tile_max) * it.scale_log2));
    float* sum = it.w.row_sum + int64_t(r) * 16;
    _mm512_storeu_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(sum), correction));
    const int channel_tiles = it.head_size / 16;
    for (int t = 0; t < channel_tiles; ++t) {
      float* acc = it.w.acc + tiled(r, t, channel_tiles, 16);
      _mm512_storeu_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(acc), correction));
    }
  }
  row_max = tile_max;
  it.w.row_limit[r] = tile_max + kMaxHeadroom / it.scale_log2;
}

// Whether some lane of `max` exceeds the row's limit (always true before the row's first key).
inline bool exceeds_limit(const Item& it, int r, __m512 max) {
  return _mm512_cmp_ps_mask(max, _mm512_set1_ps(it.w.row_limit[r]), _CMP_GT_OQ) != 0;
}

// Online softmax of one row over a tile of `width` keys that it reads whole from one source.
// Row r is row `local` of the group's score and probability tiles.
inline void softmax_row(const Item& it, int r, int local, int width, const float* score_tiles, uint16_t* prob_tiles) {
  const float* scores = score_tiles + tiled(local, 0, kKeyBlocks, 16);  // 16 keys per tile, tiles 256 apart
  uint16_t* probs = prob_tiles + tiled(local, 0, kProbBlocks, 32);      // 32 keys per tile, tiles 512 apart
  __m512 max = _mm512_loadu_ps(scores);
  for (int v = 1; v < width / 16; ++v) max = _mm512_max_ps(max, _mm512_loadu_ps(scores + 256 * v));
  if (exceeds_limit(it, r, max)) raise_max(it, r, _mm512_reduce_max_ps(max));
  const __m512 scale = _mm512_set1_ps(it.scale_log2);
  const __m512 bias = _mm512_set1_ps(it.w.row_max[r] * it.scale_log2);
  float* row_sum = it.w.row_sum + int64_t(r) * 16;
  __m512 sum = _mm512_loadu_ps(row_sum);
  for (int k = 0; k < width / 32; ++k) {
    const __m512 low = exp2_fit(_mm512_fmsub_ps(_mm512_loadu_ps(scores + 512 * k), scale, bias));
    const __m512 high = exp2_fit(_mm512_fmsub_ps(_mm512_loadu_ps(scores + 512 * k + 256), scale, bias));
    const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(high, low);
    _mm512_storeu_si512(probs + 512 * k, bf);
    sum = add_pairs(sum, bf);
  }
  _mm512_storeu_ps(row_sum, sum);
}

// Online softmax of one row over a tile with per-key sources: packed below the row's window
// start, full precision from it up to the row's position, masked after. `packed`/`full` are
// null when the tile has no such source.
inline void softmax_row_masked(const Item& it, int r, int local, int key_begin, int width, const float* packed,
                               const float* full, uint16_t* probs_packed, uint16_t* probs_full) {
  const int64_t score_row = tiled(local, 0, kKeyBlocks, 16), prob_row = tiled(local, 0, kProbBlocks, 32);
  constexpr int kMaxVecs = kMaxKeyTile / 16;
  const __m512i window = _mm512_set1_epi32(it.w.window[r]);
  const __m512i position = _mm512_set1_epi32(it.w.position[r]);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 from_packed[kMaxVecs], from_full[kMaxVecs];
  __m512 s[kMaxVecs];
  __m512 max = _mm512_set1_ps(kNegInf);
  __mmask16 seen = 0;
  for (int v = 0; v < width / 16; ++v) {
    const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(key_begin + 16 * v), lanes);
    const __mmask16 visible = _mm512_cmple_epi32_mask(key, position);
    from_packed[v] = packed ? __mmask16(_mm512_cmplt_epi32_mask(key, window) & visible) : __mmask16(0);
    from_full[v] = full ? __mmask16(_mm512_cmpge_epi32_mask(key, window) & visible) : __mmask16(0);
    seen |= from_packed[v] | from_full[v];
    s[v] = _mm512_set1_ps(kNegInf);
    if (packed) s[v] = _mm512_mask_loadu_ps(s[v], from_packed[v], packed + score_row + 256 * v);
    if (full) s[v] = _mm512_mask_loadu_ps(s[v], from_full[v], full + score_row + 256 * v);
    max = _mm512_max_ps(max, s[v]);
  }
  if (seen == 0) {  // the row sees none of these keys
    for (int k = 0; k < width / 32; ++k) {
      if (probs_packed) _mm512_storeu_si512(probs_packed + prob_row + 512 * k, _mm512_setzero_si512());
      if (probs_full) _mm512_storeu_si512(probs_full + prob_row + 512 * k, _mm512_setzero_si512());
    }
    return;
  }
  if (exceeds_limit(it, r, max)) raise_max(it, r, _mm512_reduce_max_ps(max));
  const __m512 scale = _mm512_set1_ps(it.scale_log2);
  const __m512 bias = _mm512_set1_ps(it.w.row_max[r] * it.scale_log2);
  float* row_sum = it.w.row_sum + int64_t(r) * 16;
  __m512 sum = _mm512_loadu_ps(row_sum);
  for (int v = 0; v < width / 16; v += 2) {
    const __m512 low = _mm512_maskz_mov_ps(from_packed[v] | from_full[v],
                                           exp2_fit(_mm512_fmsub_ps(s[v], scale, bias)));
    const __m512 high = _mm512_maskz_mov_ps(from_packed[v + 1] | from_full[v + 1],
                                            exp2_fit(_mm512_fmsub_ps(s[v + 1], scale, bias)));
    const __m512i bf = (__m512i)_mm512_cvtne2ps_pbh(high, low);
    sum = add_pairs(sum, bf);
    const __mmask32 packed_pair = __mmask32(from_packed[v]) | (__mmask32(from_packed[v + 1]) << 16);
    const __mmask32 full_pair = __mmask32(from_full[v]) | (__mmask32(from_full[v + 1]) << 16);
    const int64_t at = prob_row + 256 * v;  // tile v / 2
    if (probs_packed) _mm512_storeu_si512(probs_packed + at, _mm512_maskz_mov_epi16(packed_pair, bf));
    if (probs_full) _mm512_storeu_si512(probs_full + at, _mm512_maskz_mov_epi16(full_pair, bf));
  }
  _mm512_storeu_ps(row_sum, sum);
}

// Scores with softcap: s -> cap * tanh(s * scale / cap), kept in raw units (divided by scale)
// so that the softmax's scale applies as without a cap.
inline void apply_softcap(const Item& it, float* scores, int rows, KeyRange keys_range) {
  const float cap = it.p.softcap, scale = it.p.scale;
  for (int r = 0; r < rows; ++r) {
    for (int n = keys_range.begin; n < keys_range.end; ++n) {
      float& s = scores[tiled(r, n / 16, kKeyBlocks, 16) + n % 16];
      s = cap * std::tanh(s * scale / cap) / scale;
    }
  }
}

inline int round_up32(int n) { return (n + 31) / 32 * 32; }

inline void zero_rows(uint16_t* rows, int begin, int end, int pitch) {
  if (end > begin) std::memset(rows + int64_t(begin) * pitch, 0, size_t(end - begin) * pitch * 2);
}

// Packed tile: positions [start, end) of the tile [start, start + width) from the pages, zeros
// elsewhere, into `keys` and `values` (layouts of prefill_matmul.h).
void fill_packed_tile(const Item& it, int start, int width, int end, const PlaneSide& key_side,
                      const PlaneSide& value_side, uint32_t* keys, uint32_t* values) {
  const AttentionParams& p = it.p;
  const Workspace& w = it.w;
  const int key_pitch = it.packed_depth;
  for (int j = start; j < end;) {
    const int offset = j % p.block_size;
    const int count = std::min(end - j, p.block_size - offset);
    const uint8_t* plane = p.cache + int64_t(it.blocks[j / p.block_size]) * p.cache_stride_block +
                           int64_t(it.kv_head) * p.cache_stride_head;
    dequantize_plane(plane, key_side, offset, count, it.head_size, p.format.group_size, w.channel_scale,
                     w.channel_zero, w.key_rows + int64_t(j - start) * key_pitch, key_pitch);
    dequantize_plane(plane, value_side, offset, count, it.head_size, p.format.group_size, w.channel_scale,
                     w.channel_zero, w.value_rows + int64_t(j - start) * it.head_size, it.head_size);
    j += count;
  }
  zero_rows(w.key_rows, end - start, width, key_pitch);
  zero_rows(w.value_rows, end - start, width, it.head_size);
  pack_keys(w.key_rows, key_pitch, width, keys);
  pack_values(w.value_rows, it.head_size, width, values);
}

// Full-precision tile: positions [begin, end) from the ring (before the step's first position)
// or the step's own rows, zeros elsewhere.
void fill_full_tile(const Item& it, int start, int width, int begin, int end) {
  const AttentionParams& p = it.p;
  const Workspace& w = it.w;
  const int d = it.head_size;
  const int window = p.format.residual_length;
  zero_rows(w.key_rows, 0, begin - start, d);
  zero_rows(w.value_rows, 0, begin - start, d);
  for (int j = begin; j < end; ++j) {
    const uint16_t* key;
    const uint16_t* value;
    if (j < it.first_position) {
      key = it.ring_plane + int64_t(j % window) * d;
      value = key + int64_t(window) * d;
    } else {
      const int64_t token = it.seq_first_row + (j - it.first_position);
      key = static_cast<const uint16_t*>(p.key) + token * p.key_stride_token + it.kv_head * p.key_stride_head;
      value = static_cast<const uint16_t*>(p.value) + token * p.value_stride_token + it.kv_head * p.value_stride_head;
    }
    std::memcpy(w.key_rows + int64_t(j - start) * d, key, size_t(d) * 2);
    std::memcpy(w.value_rows + int64_t(j - start) * d, value, size_t(d) * 2);
  }
  zero_rows(w.key_rows, end - start, width, d);
  zero_rows(w.value_rows, end - start, width, d);
  pack_keys(w.key_rows, d, width, w.keys_full);
  pack_values(w.value_rows, d, width, w.values_full);
}

// The group's scores against a key tile: rows [row_begin, row_begin + 16 x bands).
void scores(const Item& it, const uint32_t* keys, int depth, KeyRange keys_range, float* out, int row_begin,
            int bands) {
  const uint16_t* query = it.w.query + tiled(row_begin, 0, it.query_depth / 32, 32);
  if (it.unit == MatrixUnit::kAmx) {
    amx_scores(query, it.query_depth, keys, depth, keys_range, out, bands);
  } else {
    dot_scores(query, it.query_depth, keys, depth, keys_range, out, bands);
  }
  if (it.p.softcap > 0.0f) apply_softcap(it, out, 16 * bands, keys_range);
}

void accumulate(const Item& it, const uint16_t* probs, const uint32_t* values, KeyRange keys_range, int row_begin,
                int bands) {
  float* acc = it.w.acc + tiled(row_begin, 0, it.head_size / 16, 16);
  if (it.unit == MatrixUnit::kAmx) {
    amx_accumulate(probs, values, it.head_size, keys_range, acc, bands);
  } else {
    dot_accumulate(probs, values, it.head_size, keys_range, acc, bands);
  }
}

// Which rows and sources the key tile [start, start + width) involves.
struct TilePlan {
  int row_begin;             // first row (16-aligned) that sees a key of the tile
  int packed_end;            // packed positions: [start, packed_end)
  int full_begin, full_end;  // full-precision positions
  bool masked;               // some row reads part of the tile, or both sources
};

TilePlan plan_tile(const Item& it, int start, int width, int first_row) {
  const Workspace& w = it.w;
  const int end = start + width;
  const int last = it.padded_rows - 1;  // padded rows repeat the last row's geometry
  TilePlan t;
  t.row_begin = first_row / kRowAlignment * kRowAlignment;
  t.packed_end = std::max(start, std::min(end, w.window[last]));
  t.full_begin = std::max(start, w.window[first_row]);
  t.full_end = it.p.format.residual_length > 0 ? std::min(end, w.position[last] + 1) : t.full_begin;
  const bool aligned = t.row_begin == first_row;
  const bool all_packed = end <= w.window[first_row];
  const bool all_full = start >= w.window[last] && end - 1 <= w.position[first_row];
  t.masked = !(aligned && (all_packed || all_full));
  return t;
}

// The packed keys and values of the tile [start, start + width): a shared tile of the plan when
// the tile is one (filled here if no item has claimed it yet), else the workspace's, filled here.
struct PackedTile {
  const uint32_t* keys;
  const uint32_t* values;
};

PackedTile packed_tile(const Item& it, int start, int width, int end, const PlaneSide& key_side,
                       const PlaneSide& value_side, int seq) {
  const SharedTiles& shared = it.plan.shared;
  const int index = start / kMaxKeyTile;
  if (width == kMaxKeyTile && start % kMaxKeyTile == 0 && index < shared.count[seq]) {
    const int tile = shared.first[seq] + it.kv_head * shared.count[seq] + index;
    uint32_t* keys = reinterpret_cast<uint32_t*>(shared.data + tile * shared.tile_bytes);
    uint32_t* values = keys + int64_t(kMaxKeyTile) * it.packed_depth / 2;
    const PackedTile result{keys, values};
    std::atomic<uint8_t>& state = shared.state[tile];
    if (state.load(std::memory_order_acquire) == 2) return result;
    uint8_t empty = 0;
    if (state.compare_exchange_strong(empty, 1, std::memory_order_acquire)) {
      fill_packed_tile(it, start, width, start + width, key_side, value_side, keys, values);
      state.store(2, std::memory_order_release);
      return result;
    }  // another item is filling it: fill a private copy rather than wait
  }
  fill_packed_tile(it, start, width, end, key_side, value_side, it.w.keys_packed, it.w.values_packed);
  return {it.w.keys_packed, it.w.values_packed};
}

void attend_tile(const Item& it, int start, int width, int first_row, const PlaneSide& key_side,
                 const PlaneSide& value_side, int seq) {
  const Workspace& w = it.w;
  const TilePlan t = plan_tile(it, start, width, first_row);
  const bool has_packed = t.packed_end > start, has_full = t.full_end > t.full_begin;
  PackedTile packed{nullptr, nullptr};
  if (has_packed) packed = packed_tile(it, start, width, t.packed_end, key_side, value_side, seq);
  if (has_full) fill_full_tile(it, start, width, t.full_begin, t.full_end);
  for (int group = t.row_begin; group < it.padded_rows; group += kGroupRows) {
    const int bands = std::min(kGroupRows, it.padded_rows - group) / 16;
    // Keys that some row of the group reads from each source (all of them in unmasked tiles).
    const int last = group + 16 * bands - 1;
    const KeyRange from_packed{0, round_up32(std::min(t.packed_end, w.window[last]) - start)};
    const KeyRange from_full{std::max(0, w.window[group] - start) / 32 * 32,
                             round_up32(std::min(t.full_end, w.position[last] + 1) - start)};
    const bool read_packed = has_packed && from_packed.end > 0;
    const bool read_full = has_full && from_full.end > from_full.begin;
    if (read_packed) scores(it, packed.keys, it.packed_depth, from_packed, w.scores_packed, group, bands);
    if (read_full) scores(it, w.keys_full, it.head_size, from_full, w.scores_full, group, bands);
    // Padding rows (past it.rows) need no softmax: their probabilities only reach accumulator
    // rows that are never stored.
    for (int local = 0; local < std::min(16 * bands, it.rows - group); ++local) {
      const int r = group + local;
      if (!t.masked) {
        if (has_packed) softmax_row(it, r, local, width, w.scores_packed, w.probs_packed);
        else softmax_row(it, r, local, width, w.scores_full, w.probs_full);
        continue;
      }
      softmax_row_masked(it, r, local, start, width, has_packed ? w.scores_packed : nullptr,
                         has_full ? w.scores_full : nullptr, has_packed ? w.probs_packed : nullptr,
                         has_full ? w.probs_full : nullptr);
    }
    if (read_packed) accumulate(it, w.probs_packed, packed.values, from_packed, group, bands);
    if (read_full) accumulate(it, w.probs_full, w.values_full, from_full, group, bands);
  }
}

// Row r = query token r / heads_per_kv, query head kv_head * heads_per_kv + r % heads_per_kv;
// rows past the item's own (up to a multiple of 16) repeat the last row's geometry, query zero.
void load_rows(const Item& it, int query_begin) {
  const AttentionParams& p = it.p;
  const Workspace& w = it.w;
  for (int r = 0; r < it.padded_rows; ++r) {
    const int source = std::min(r, it.rows - 1);
    const int token = query_begin + source / it.heads_per_kv;
    const int head = it.kv_head * it.heads_per_kv + source % it.heads_per_kv;
    w.position[r] = it.first_position + token;
    w.window[r] = window_start(w.position[r], p.block_size, p.format.residual_length);
    w.row_max[r] = kNegInf;
    w.row_limit[r] = kNegInf;
    _mm512_storeu_ps(w.row_sum + int64_t(r) * 16, _mm512_setzero_ps());
    const uint16_t* query = static_cast<const uint16_t*>(p.query) +
                            (it.seq_first_row + token) * p.query_stride_token + head * p.query_stride_head;
    const int steps = it.head_size / 32;  // 32 channels per query tile; the row twice (split keys)
    for (int step = 0; step < steps; ++step) {
      const __m512i q = r < it.rows ? _mm512_loadu_si512(query + 32 * step) : _mm512_setzero_si512();
      _mm512_storeu_si512(w.query + tiled(r, step, 2 * steps, 32), q);
      _mm512_storeu_si512(w.query + tiled(r, steps + step, 2 * steps, 32), q);
    }
  }
  std::memset(w.acc, 0, size_t(it.padded_rows) * it.head_size * 4);
}

// One key partition's rows for reduce_partitions (attention.h): the reference max in natural
// units of the scaled scores, the sum, the accumulator in channel order.
void store_partial_rows(const Item& it, float* slots) {
  const int channel_tiles = it.head_size / 16;
  for (int r = 0; r < it.rows; ++r) {
    float* slot = slots + int64_t(r) * (it.head_size + 2);
    slot[0] = it.w.row_max[r] * it.p.scale;
    slot[1] = _mm512_reduce_add_ps(_mm512_loadu_ps(it.w.row_sum + int64_t(r) * 16));
    for (int t = 0; t < channel_tiles; ++t) {
      _mm512_storeu_ps(slot + 2 + 16 * t, _mm512_loadu_ps(it.w.acc + tiled(r, t, channel_tiles, 16)));
    }
  }
}

void store_rows(const Item& it, int query_begin) {
  const AttentionParams& p = it.p;
  for (int r = 0; r < it.rows; ++r) {
    const int token = query_begin + r / it.heads_per_kv;
    const int head = it.kv_head * it.heads_per_kv + r % it.heads_per_kv;
    const float sum = _mm512_reduce_add_ps(_mm512_loadu_ps(it.w.row_sum + int64_t(r) * 16));
    const __m512 inv = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
    uint16_t* out = static_cast<uint16_t*>(p.out) + (it.seq_first_row + token) * p.out_stride_token +
                    head * p.out_stride_head;
    const int channel_tiles = it.head_size / 16;
    for (int t = 0; t < channel_tiles; ++t) {
      const __m512 acc = _mm512_loadu_ps(it.w.acc + tiled(r, t, channel_tiles, 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * t), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc, inv)));
    }
  }
}

void attend_item(const AttentionParams& p, const PrefillPlan& plan, const PrefillItem& item, const Workspace& w,
                 float* partial) {
  const MatrixUnit unit = plan.unit;
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  const int seq_first_row = p.seqs.query_start_loc[item.seq];
  const int query_len = p.seqs.query_start_loc[item.seq + 1] - seq_first_row;
  const int rows = item.query_count * heads_per_kv;
  const bool split_keys = p.format.key_bits != kUnquantizedBits;
  const uint16_t* ring_plane = nullptr;
  if (p.format.residual_length > 0) {
    ring_plane = static_cast<const uint16_t*>(p.ring.ring) + int64_t(p.ring.block_ids[item.seq]) * p.ring.stride_block +
                 int64_t(item.kv_head) * p.ring.stride_head;
  }
  const Item it{p,
                w,
                plan,
                unit,
                p.head_size,
                item.kv_head,
                heads_per_kv,
                rows,
                (rows + kRowAlignment - 1) / kRowAlignment * kRowAlignment,
                2 * p.head_size,
                split_keys ? 2 * p.head_size : p.head_size,
                seq_first_row,
                p.seqs.seq_lens[item.seq] - query_len,
                p.block_table + int64_t(item.seq) * p.block_table_stride,
                ring_plane,
                p.scale * kLog2e};
  const PlaneLayout layout(p.format, p.head_size, 2, p.block_size);
  const PlaneSide key_side{0, layout.key_params_offset, p.format.key_bits, p.format.key_group_size, split_keys};
  const PlaneSide value_side{layout.value_codes_offset, layout.value_params_offset, p.format.value_bits, 0, false};

  load_rows(it, item.query_begin);
  if (unit == MatrixUnit::kAmx) amx_begin();
  const int key_end = std::min(item.key_end, w.position[it.padded_rows - 1] + 1);
  // A tile boundary where the first row's window starts (rounded down to 32): every row reads
  // all keys before it from the pages, so those tiles take the unmasked path.
  const int clean_end = std::min(key_end, w.window[0] / 32 * 32);
  int first_row = 0;  // first row whose position reaches the tile: rows are sorted by position
  for (int start = item.key_begin; start < key_end;) {
    const int limit = start < clean_end ? clean_end : key_end;
    const int width = std::min(kMaxKeyTile, (limit - start + 31) / 32 * 32);
    while (w.position[first_row] < start) ++first_row;
    attend_tile(it, start, width, first_row, key_side, value_side, item.seq);
    start += width;
  }
  if (unit == MatrixUnit::kAmx) amx_release();
  if (item.partial_offset >= 0) {
    store_partial_rows(it, partial + item.partial_offset * (p.head_size + 2));
  } else {
    store_rows(it, item.query_begin);
  }
}

}  // namespace
}  // namespace kvtuner::cpu::prefill

#undef KVT_PREFILL_TARGET_REGION
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#endif  // KVT_PREFILL_X86

// ---------------------------------------------------------------------------------------
// 3. Plan and entry points
// ---------------------------------------------------------------------------------------

namespace kvtuner::cpu {
namespace {

// What the kernel's tiles support; everything else stays on the vector kernel.
bool supported(const AttentionParams& p) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  return p.dtype == ElemType::kBFloat16 && p.head_size % 32 == 0 && p.head_size <= 256 && p.scale > 0.0f &&
         heads_per_kv <= kMaxItemRows;
}

// Sequences with more than one item per KV head share their whole packed tiles: those below
// the window of the sequence's last position, which every item reading them reads whole. The
// storage stays with the planning thread, so it is capped (the longest contexts fill their own).
constexpr int64_t kMaxSharedBytes = int64_t(64) << 20;

void share_packed_tiles(const AttentionParams& p, int tile_tokens, PrefillPlan& plan) {
  SharedTiles& shared = plan.shared;
  shared.first.assign(p.seqs.num_seqs, 0);
  shared.count.assign(p.seqs.num_seqs, 0);
  const bool split_keys = p.format.key_bits != kUnquantizedBits;
  shared.tile_bytes = int64_t(kMaxKeyTile) * ((split_keys ? 2 : 1) * p.head_size + p.head_size) * 2;
  int total = 0;
  for (int seq = 0; seq < p.seqs.num_seqs; ++seq) {
    const int seq_len = p.seqs.seq_lens[seq];
    const int query_len = p.seqs.query_start_loc[seq + 1] - p.seqs.query_start_loc[seq];
    const int first_position = seq_len - query_len;
    const bool several_items = (seq_len - 1) / tile_tokens > first_position / tile_tokens;
    if (!plan.routes(seq) || !several_items) continue;
    const int count = window_start(seq_len - 1, p.block_size, p.format.residual_length) / kMaxKeyTile;
    if ((total + int64_t(count) * p.num_kv_heads) * shared.tile_bytes > kMaxSharedBytes) continue;
    shared.first[seq] = total;
    shared.count[seq] = count;
    total += count * p.num_kv_heads;
  }
  thread_local std::vector<char> storage;  // the planning thread's, reused by its next calls
  const size_t bytes = size_t(total) * shared.tile_bytes + 64;
  if (storage.size() < bytes) storage.resize(bytes);
  shared.data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) / 64 * 64);
  shared.state.reset(new std::atomic<uint8_t>[std::max(total, 1)]());
}

// Query tokens per item: as many as fill kMaxItemRows rows, fewer while the items would not
// keep every thread busy (one prompt on many cores). Item ranges are aligned to absolute
// positions (multiples of 32 tokens where the heads allow), so that the causal diagonal of an
// item falls in one narrow key tile and every tile before it needs no mask.
int query_tile_tokens(const AttentionParams& p, int num_threads, int64_t routed_tokens) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  int tokens = std::max(1, kMaxItemRows / heads_per_kv);
  if (tokens >= 32) tokens = tokens / 32 * 32;
  const int64_t wanted_items = 2 * int64_t(num_threads);
  while (tokens > 32 && (routed_tokens / tokens + 1) * p.num_kv_heads < wanted_items) tokens /= 2;
  return tokens;
}

// A sequence's query tokens [query_begin, query_begin + query_count) over keys [0, key_end).
struct QueryTile {
  int seq, query_begin, query_count, key_end;
  int64_t cost;  // per KV head
};

std::vector<QueryTile> query_tiles(const AttentionParams& p, const PrefillPlan& plan, int tile_tokens) {
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  std::vector<QueryTile> tiles;
  for (int seq = 0; seq < p.seqs.num_seqs; ++seq) {
    if (!plan.routes(seq)) continue;
    const int query_len = p.seqs.query_start_loc[seq + 1] - p.seqs.query_start_loc[seq];
    const int first_position = p.seqs.seq_lens[seq] - query_len;
    for (int position = first_position; position < first_position + query_len;) {
      const int end = std::min(first_position + query_len, (position / tile_tokens + 1) * tile_tokens);
      tiles.push_back({seq, position - first_position, end - position, end, int64_t(end - position) * heads_per_kv * end});
      position = end;
    }
  }
  return tiles;
}

// Keys per partition, at least: below it the merge costs more than the threads gain.
constexpr int kMinPartitionKeys = 512;

// One item per KV head for `tile`, or, where it alone would hold up the other threads (few
// short query chunks over long contexts), one per key partition of whole key tiles, with the
// merge of the partitions added to the vector plan's reductions and partial rows.
void add_items(const QueryTile& tile, int heads_per_kv, int num_kv_heads, int64_t target_cost, PrefillPlan& plan,
               std::vector<ReduceItem>& reductions, int64_t& partial_rows) {
  const int64_t wanted = (tile.cost + target_cost - 1) / target_cost;
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(wanted, tile.key_end / kMinPartitionKeys)));
  const int part_keys = ((tile.key_end + parts - 1) / parts + kMaxKeyTile - 1) / kMaxKeyTile * kMaxKeyTile;
  const int rows = tile.query_count * heads_per_kv;
  for (int kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
    if (parts == 1) {
      plan.items.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, 0, tile.key_end, -1, tile.cost});
      continue;
    }
    int count = 0;
    for (int begin = 0; begin < tile.key_end; begin += part_keys, ++count) {
      const int end = std::min(tile.key_end, begin + part_keys);
      plan.items.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, begin, end,
                            partial_rows + int64_t(count) * rows, int64_t(rows) * (end - begin)});
    }
    reductions.push_back({tile.seq, kv_head, tile.query_begin, tile.query_count, count, partial_rows});
    partial_rows += int64_t(count) * rows;
  }
}

template <typename Items>
void drop_routed(const PrefillPlan& plan, std::vector<Items>& items) {
  items.erase(std::remove_if(items.begin(), items.end(), [&](const Items& item) { return plan.routes(item.seq); }),
              items.end());
}

}  // namespace

PrefillPlan plan_prefill(const AttentionParams& p, int num_threads, AttentionPlan& vector_plan) {
  PrefillPlan plan;
  // Both variables are read at every call, also where no sequence is routed, so that a bad
  // value raises whatever the batch.
  plan.unit = std::min(detected_matrix_unit(), prefill_unit_cap());
  const int min_rows = prefill_min_rows(kMinPrefillRows);
  if (plan.unit == MatrixUnit::kNone || !supported(p)) return plan;
  const int heads_per_kv = p.num_q_heads / p.num_kv_heads;
  plan.routed.assign(p.seqs.num_seqs, 0);
  int64_t routed_tokens = 0;
  for (int seq = 0; seq < p.seqs.num_seqs; ++seq) {
    const int query_len = p.seqs.query_start_loc[seq + 1] - p.seqs.query_start_loc[seq];
    if (query_len > 0 && int64_t(query_len) * heads_per_kv >= min_rows) {
      plan.routed[seq] = 1;
      routed_tokens += query_len;
    }
  }
  if (routed_tokens == 0) {
    plan.routed.clear();
    return plan;
  }
  const int tile_tokens = query_tile_tokens(p, num_threads, routed_tokens);
  const std::vector<QueryTile> tiles = query_tiles(p, plan, tile_tokens);
  int64_t total_cost = 0;
  for (const QueryTile& tile : tiles) total_cost += tile.cost * p.num_kv_heads;
  const int64_t target_cost = std::max<int64_t>(1, total_cost / (4 * int64_t(num_threads)));
  drop_routed(plan, vector_plan.items);
  drop_routed(plan, vector_plan.reductions);
  for (const QueryTile& tile : tiles) {
    add_items(tile, heads_per_kv, p.num_kv_heads, target_cost, plan, vector_plan.reductions, vector_plan.partial_rows);
  }
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const PrefillItem& a, const PrefillItem& b) { return a.cost > b.cost; });
  share_packed_tiles(p, tile_tokens, plan);
  return plan;
}

void run_prefill_item(const AttentionParams& params, const PrefillPlan& plan, const PrefillItem& item,
                      float* partial) {
#if defined(KVT_PREFILL_X86)
  const int rows = item.query_count * (params.num_q_heads / params.num_kv_heads);
  const Workspace w = thread_workspace((rows + kRowAlignment - 1) / kRowAlignment * kRowAlignment, params.head_size);
  prefill::attend_item(params, plan, item, w, partial);
#else
  (void)params, (void)plan, (void)item, (void)partial;  // plan_prefill routes nothing without x86 matrix units
#endif
}

}  // namespace kvtuner::cpu
