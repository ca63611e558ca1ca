// paged_attention: varlen causal attention of query rows over the packed pages, the
// per-request rings and the step's own key/value rows (kvtuner_vllm/format.py
// `paged_attention_ref`): the query at position p reads key j < w0(p) dequantized from the
// packed pages and j >= w0(p) in the model dtype (the ring for positions of earlier steps, the
// step's rows for its own); GQA; optional softcap.
//
// A block of 128 threads owns a tile of query rows ((query token, query head) pairs of one
// sequence and one KV head, in position order), one KV head and one partition of the keys.
// It walks its keys in chunks of kKeys: each chunk of K and V is dequantized ONCE into shared
// memory (fp32) and used by every row of the tile, with an online softmax in between:
//   stage K, V -> scores (rows x keys) -> softmax -> accumulate (rows x channels).
// Decode tiles are kDecodeRows rows (a GQA group) and their context is split into partitions
// that reduce_partitions_kernel merges; prefill tiles are 32-64 rows, so a long prompt
// dequantizes each K/V chunk once per 64 rows, not once per 8.
//
// Window (R > 0): w0 is monotone in p, so for a tile with positions [p_first, p_last] a chunk
// is read packed by every row (keys < w0(p_first)), in full precision by every row
// (keys >= w0(p_last)) or, in between, "mixed": both sources are staged in turn and each
// (row, key) pair takes the one its row reads. Keys that no row reads from a source are staged
// as zeros, so data that is not there (incomplete kivi groups, stale ring rows) never meets a
// multiply.
#pragma once

#include <climits>

#include "cuda/kernels/api.h"
#include "cuda/kernels/common.cuh"

namespace kvtuner::cuda {

constexpr int kAttnThreads = 128;
constexpr int kReduceThreads = 128;

// Tile shapes and the thread mapping of each phase, per head size and kernel.
template <int kHeadSize, bool kDecode>
struct Tile {
  static constexpr int kRows = kDecode ? kDecodeRows : prefill_tile_rows(kHeadSize);
  static constexpr int kKeys = kHeadSize > 128 ? 16 : 32;  // keys per chunk
  // Floats per staged row: 16-byte aligned, and consecutive keys start 4 banks apart, so a
  // quarter warp reading float4s of 8 consecutive keys is conflict-free.
  static constexpr int kStride = kHeadSize + 4;
  static constexpr int kLanes = kHeadSize / kChannelsPerLane;  // 8-channel pieces of a row

  // Scores: each thread a kScoreRows x kScoreKeys block; keys kt + i * kKeyThreads, rows
  // rt + i * kRowThreads (thread = rt * kKeyThreads + kt).
  static constexpr int kDots = kRows * kKeys / kAttnThreads;
  static constexpr int kScoreRows = kDots >= 16 ? 4 : (kDots >= 4 ? 2 : 1);
  static constexpr int kScoreKeys = kDots / kScoreRows;
  static constexpr int kKeyThreads = kKeys / kScoreKeys;
  static constexpr int kRowThreads = kAttnThreads / kKeyThreads;

  // Softmax: kRowLanes aligned lanes per row.
  static constexpr int kRowLanes = kAttnThreads / kRows;

  // Values: an item is kOutRows rows x 8 channels (channels 4c..4c+3 and D/2 + 4c..4c+3, so
  // consecutive threads read consecutive float4s).
  static constexpr int kOutRowsWanted = kRows * kHeadSize / 1024;
  static constexpr int kOutRows = kOutRowsWanted >= 8 ? 8 : (kOutRowsWanted >= 4 ? 4 : (kOutRowsWanted >= 2 ? 2 : 1));
  static constexpr int kOutItems = kRows / kOutRows * kLanes;
  static constexpr int kOutItemsPerThread = (kOutItems + kAttnThreads - 1) / kAttnThreads;

  static_assert(kRowThreads * kScoreRows == kRows && kKeyThreads * kScoreKeys == kKeys, "score mapping");
  static_assert(kRowLanes >= 2 && kRowLanes <= kWarpSize, "softmax lanes per row");
  static_assert(kRows % kOutRows == 0 && kHeadSize % 16 == 0, "value mapping");
};

template <int kHeadSize, bool kDecode>
struct AttentionShared {
  using S = Tile<kHeadSize, kDecode>;
  alignas(16) float q[S::kRows][S::kStride];  // the tile's query rows, pre-scaled
  alignas(16) float key[S::kKeys][S::kStride];
  alignas(16) float value[S::kKeys][S::kStride];
  float prob[S::kKeys][S::kRows];  // scores, then softmax numerators, of one chunk
  float row_max[S::kRows], row_sum[S::kRows], row_alpha[S::kRows];
  int row_pos[S::kRows];  // position of each row's query token; -1: no row (sees no key)
  int row_w0[S::kRows];   // w0 of that position: keys from there on are read in full precision
};

// Keys per partition of a sequence of seq_len keys split `parts` ways (a multiple of every
// chunk size): computed on the device from each sequence's own length.
__host__ __device__ __forceinline__ int partition_length(int seq_len, int parts) {
  const int even = (seq_len + parts - 1) / parts;
  const int len = (even + kPartitionGranule - 1) / kPartitionGranule * kPartitionGranule;
  return len > kPartitionGranule ? len : kPartitionGranule;
}

// The prefill tiles of sequence s start at floor(query_start_loc[s] * group / rows) + s:
// monotone, at least ceil(q_len * group / rows) tiles per sequence, and computable from
// query_start_loc alone (no prefix sum, no host sync). Some tiles stay empty.
__device__ __forceinline__ int64_t prefill_tile_begin(const int32_t* query_start_loc, int seq, int group, int rows) {
  return int64_t(query_start_loc[seq]) * group / rows + seq;
}

__device__ __forceinline__ int prefill_tile_sequence(const SequenceArgs& seqs, int group, int rows, int64_t tile) {
  int lo = 0, hi = seqs.num_seqs - 1;  // the last sequence whose first tile is <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefill_tile_begin(seqs.query_start_loc, mid, group, rows) <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// What one block works on.
struct TileWork {
  int seq, tile, kv_head, part;
  SequenceRows s;
  int64_t first_row;  // the tile's first row among the sequence's q_len * group rows
  int num_rows;
  int first_pos, last_pos;  // positions of the first and last row's query token
  int key_begin, key_end;   // keys of this block: a partition, cut to what the rows can see
  const uint8_t* head_cache;  // cache of this KV head in block 0
  const int32_t* blocks;      // the sequence's block table row
};

// Fills `w` for this block; false when the block has nothing to do (uniform: before any barrier).
template <bool kDecode, int kRows>
__device__ __forceinline__ bool locate_tile(const AttentionLaunch& launch, TileWork& w) {
  const AttentionParams& p = launch.p;
  const int group = p.num_q_heads / p.num_kv_heads;
  if constexpr (kDecode) {
    w.seq = int(blockIdx.x / launch.plan.decode_tiles_per_seq);
    w.tile = int(blockIdx.x % launch.plan.decode_tiles_per_seq);
  } else {
    w.seq = prefill_tile_sequence(p.seqs, group, kRows, blockIdx.x);
    w.tile = int(int64_t(blockIdx.x) - prefill_tile_begin(p.seqs.query_start_loc, w.seq, group, kRows));
  }
  w.s = checked_sequence_rows(p.seqs, w.seq);
  KVT_DEVICE_CHECK(w.s.rows <= p.max_query_len, "a query is longer than max_query_len", w.s.rows);
  const bool decode_sequence = w.s.rows <= kDecodeMaxQuery;
  if (w.s.rows == 0 || decode_sequence != kDecode) return false;
  w.first_row = int64_t(w.tile) * kRows;
  const int64_t total_rows = int64_t(w.s.rows) * group;
  if (w.first_row >= total_rows) return false;
  w.num_rows = int(min(int64_t(kRows), total_rows - w.first_row));
  w.first_pos = w.s.first + int(w.first_row / group);
  w.last_pos = w.s.first + int((w.first_row + w.num_rows - 1) / group);

  const int seq_len = w.s.first + w.s.rows;
  const int parts = kDecode ? launch.plan.num_partitions : 1;
  w.part = blockIdx.z;
  w.key_begin = 0;
  w.key_end = w.last_pos + 1;
  if (parts > 1) {
    const int len = partition_length(seq_len, parts);
    w.key_begin = w.part * len;
    if (w.key_begin >= seq_len) return false;  // past the sequence: the reduce never reads it
    w.key_end = min(w.key_end, w.key_begin + len);
  }
  w.kv_head = blockIdx.y;
  w.head_cache = p.cache + int64_t(w.kv_head) * p.cache_stride_head;
  w.blocks = p.block_table + int64_t(w.seq) * p.block_table_stride;
  const int window = p.format.residual_length;
  if (window > 0 && window_start(w.first_pos, p.block_size, window) < w.s.first) {
    KVT_DEVICE_CHECK(p.ring.block_ids[w.seq] >= 0 && p.ring.block_ids[w.seq] < launch.num_ring_blocks,
                     "ring block id out of range", p.ring.block_ids[w.seq]);
  }
  return true;
}

// One side (K or V) of the packed pages.
struct PackedSide {
  int64_t codes_offset, params_offset;  // bytes from the plane start
  int64_t code_bytes, param_bytes;      // per token
  int bits, group_size;
  int key_group_size;  // kivi keys: (scale, zero) per channel per token group; 0: per-token groups
};

__device__ __forceinline__ PackedSide packed_side(const AttentionParams& p, int elem_size, bool value_side) {
  const PlaneLayout layout(p.format, p.head_size, elem_size, p.block_size);
  if (value_side) {
    return PackedSide{layout.value_codes_offset, layout.value_params_offset, layout.value_code_bytes,
                      layout.value_param_bytes, p.format.value_bits, p.format.group_size, 0};
  }
  const bool kivi = p.format.key_group_size > 0 && p.format.key_bits != kUnquantizedBits;
  return PackedSide{0, layout.key_params_offset, layout.key_code_bytes, layout.key_param_bytes, p.format.key_bits,
                    p.format.group_size, kivi ? p.format.key_group_size : 0};
}

// Channels lane*8 .. lane*8+7 of the token at `offset` of a plane, dequantized (format.py `decode`).
template <typename T, int kHeadSize>
__device__ __forceinline__ void dequantize_lane(const PackedSide& side, const uint8_t* plane, int offset, int lane,
                                                float (&x)[kChannelsPerLane]) {
  const uint8_t* codes = plane + side.codes_offset + int64_t(offset) * side.code_bytes;
  switch (side.bits) {
    case kUnquantizedBits: return load_raw<T>(codes + lane * kChannelsPerLane * sizeof(T), x);
    case 2: load_codes<2>(codes + lane * 2, x); break;
    case 4: load_codes<4>(codes + lane * 4, x); break;
    default: load_codes<8>(codes + lane * 8, x); break;
  }
  if (side.key_group_size > 0) {  // kivi keys: the token group's pair of each channel
    const uint8_t* params = plane + side.params_offset +
                            int64_t(offset / side.key_group_size) * kParamBytesPerGroup * kHeadSize +
                            lane * kChannelsPerLane * kParamBytesPerGroup;
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) {
      const float2 sz = load_scale_zero(params + c * kParamBytesPerGroup);
      x[c] = fmaf(x[c], sz.x, sz.y);
    }
  } else {
    const float2 sz = load_scale_zero(plane + side.params_offset + int64_t(offset) * side.param_bytes +
                                      (lane * kChannelsPerLane / side.group_size) * kParamBytesPerGroup);
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) x[c] = fmaf(x[c], sz.x, sz.y);
  }
}

// Full-precision K or V of position j (8 channels from lane * 8): the step's row when
// j >= first, else the sequence's ring row j mod R.
template <typename T>
__device__ __forceinline__ const T* full_precision_row(const AttentionParams& p, const TileWork& w, bool value_side,
                                                       int j, int lane) {
  const int channel = lane * kChannelsPerLane;
  if (j >= w.s.first) {
    const int64_t row = w.s.start + (j - w.s.first);
    return value_side
               ? static_cast<const T*>(p.value) + row * p.value_stride_token + w.kv_head * p.value_stride_head + channel
               : static_cast<const T*>(p.key) + row * p.key_stride_token + w.kv_head * p.key_stride_head + channel;
  }
  const int window = p.format.residual_length;
  const T* plane = static_cast<const T*>(p.ring.ring) + int64_t(p.ring.block_ids[w.seq]) * p.ring.stride_block +
                   w.kv_head * p.ring.stride_head;
  return plane + (value_side ? int64_t(window) * p.head_size : 0) + int64_t(j % window) * p.head_size + channel;
}

// Stages K or V of keys [chunk, chunk + n) from one source into `buf` (fp32); keys outside
// [lo, hi) (read from this source by no row) and past n become zeros.
template <typename T, int kHeadSize, bool kDecode>
__device__ void stage_chunk(const AttentionLaunch& launch, const TileWork& w, bool value_side, bool full, int chunk,
                            int n, int lo, int hi, float (*buf)[Tile<kHeadSize, kDecode>::kStride]) {
  using S = Tile<kHeadSize, kDecode>;
  const AttentionParams& p = launch.p;
  const PackedSide side = packed_side(p, int(sizeof(T)), value_side);
  for (int item = threadIdx.x; item < S::kKeys * S::kLanes; item += kAttnThreads) {
    const int k = item / S::kLanes;
    const int lane = item % S::kLanes;
    const int j = chunk + k;
    float x[kChannelsPerLane] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (k < n && j >= lo && j < hi) {
      if (full) {
        load_row8(full_precision_row<T>(p, w, value_side, j, lane), x);
      } else {
        const int block = w.blocks[j / p.block_size];
        KVT_DEVICE_CHECK(block >= 0 && block < launch.num_cache_blocks, "block id out of range", block);
        dequantize_lane<T, kHeadSize>(side, w.head_cache + int64_t(block) * p.cache_stride_block,
                                      j % p.block_size, lane, x);
      }
    }
    float4* dst = reinterpret_cast<float4*>(&buf[k][lane * kChannelsPerLane]);
    dst[0] = make_float4(x[0], x[1], x[2], x[3]);
    dst[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
}

// Scores of the staged keys for every row into sh.prob (invisible: -inf). In a mixed chunk
// only the (row, key) pairs that read this source are written.
template <int kHeadSize, bool kDecode>
__device__ void score_chunk(AttentionShared<kHeadSize, kDecode>& sh, float softcap, int chunk, int n, bool mixed,
                            bool full) {
  using S = Tile<kHeadSize, kDecode>;
  const int kt = threadIdx.x % S::kKeyThreads;
  const int rt = threadIdx.x / S::kKeyThreads;
  float dot[S::kScoreRows][S::kScoreKeys];
#pragma unroll
  for (int i = 0; i < S::kScoreRows; ++i) {
#pragma unroll
    for (int j = 0; j < S::kScoreKeys; ++j) dot[i][j] = 0.0f;
  }
  // Rows rt, rt + kRowThreads, ...: when the first is past the tile's rows, all are (decode
  // tiles of a small GQA group), and the whole warp skips the dots.
  const bool rows_used = sh.row_pos[rt] >= 0;
#pragma unroll 4
  for (int c = 0; c < kHeadSize && rows_used; c += 4) {
    float4 q[S::kScoreRows], k[S::kScoreKeys];
#pragma unroll
    for (int i = 0; i < S::kScoreRows; ++i) q[i] = *reinterpret_cast<const float4*>(&sh.q[rt + i * S::kRowThreads][c]);
#pragma unroll
    for (int j = 0; j < S::kScoreKeys; ++j) k[j] = *reinterpret_cast<const float4*>(&sh.key[kt + j * S::kKeyThreads][c]);
#pragma unroll
    for (int i = 0; i < S::kScoreRows; ++i) {
#pragma unroll
      for (int j = 0; j < S::kScoreKeys; ++j) {
        dot[i][j] = fmaf(q[i].x, k[j].x, dot[i][j]);
        dot[i][j] = fmaf(q[i].y, k[j].y, dot[i][j]);
        dot[i][j] = fmaf(q[i].z, k[j].z, dot[i][j]);
        dot[i][j] = fmaf(q[i].w, k[j].w, dot[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < S::kScoreRows; ++i) {
    const int r = rt + i * S::kRowThreads;
#pragma unroll
    for (int j = 0; j < S::kScoreKeys; ++j) {
      const int k = kt + j * S::kKeyThreads;
      const int key = chunk + k;
      if (mixed && (key >= sh.row_w0[r]) != full) continue;
      const float score = softcap > 0.0f ? tanhf(dot[i][j] / softcap) * softcap : dot[i][j];
      sh.prob[k][r] = k < n && key <= sh.row_pos[r] ? score : -INFINITY;
    }
  }
}

// Online softmax over the chunk's scores: turns them into numerators exp(s - max) and updates
// each row's running max and sum; row_alpha rescales the accumulators.
template <int kHeadSize, bool kDecode>
__device__ void softmax_chunk(AttentionShared<kHeadSize, kDecode>& sh) {
  using S = Tile<kHeadSize, kDecode>;
  const int r = threadIdx.x / S::kRowLanes;
  const int sub = threadIdx.x % S::kRowLanes;
  float m = -INFINITY;
  for (int k = sub; k < S::kKeys; k += S::kRowLanes) m = fmaxf(m, sh.prob[k][r]);
  m = lanes_max(m, S::kRowLanes);
  const float old_max = sh.row_max[r];
  const float new_max = fmaxf(old_max, m);
  float sum = 0.0f;
  for (int k = sub; k < S::kKeys; k += S::kRowLanes) {
    const float e = new_max == -INFINITY ? 0.0f : expf(sh.prob[k][r] - new_max);
    sh.prob[k][r] = e;
    sum += e;
  }
  sum = lanes_sum(sum, S::kRowLanes);
  __syncwarp();  // every lane has read row_max before lane 0 of the row overwrites it
  if (sub == 0) {
    const float alpha = old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
    sh.row_sum[r] = sh.row_sum[r] * alpha + sum;
    sh.row_max[r] = new_max;
    sh.row_alpha[r] = alpha;
  }
}

// This thread's output items: acc[item][row][channel], channels 4c..4c+3 then D/2 + 4c..4c+3.
template <int kHeadSize, bool kDecode>
struct Accumulator {
  using S = Tile<kHeadSize, kDecode>;
  float acc[S::kOutItemsPerThread][S::kOutRows][kChannelsPerLane];

  __device__ __forceinline__ static int item(int m) { return threadIdx.x + m * kAttnThreads; }
  __device__ __forceinline__ static int first_row(int m) { return item(m) / S::kLanes * S::kOutRows; }
  __device__ __forceinline__ static int channel(int m, int c) {
    return (item(m) % S::kLanes) * 4 + (c < 4 ? c : kHeadSize / 2 + c - 4);
  }

  __device__ __forceinline__ void scale_rows(const float* alpha) {
#pragma unroll
    for (int m = 0; m < S::kOutItemsPerThread; ++m) {
#pragma unroll
      for (int i = 0; i < S::kOutRows; ++i) {
        const float a = item(m) < S::kOutItems ? alpha[first_row(m) + i] : 0.0f;
#pragma unroll
        for (int c = 0; c < kChannelsPerLane; ++c) acc[m][i][c] *= a;
      }
    }
  }

  // acc += prob x staged values over the chunk's n keys (mixed: only the pairs reading this source).
  __device__ __forceinline__ void add_chunk(const AttentionShared<kHeadSize, kDecode>& sh, int chunk, int n,
                                            bool mixed, bool full) {
#pragma unroll
    for (int m = 0; m < S::kOutItemsPerThread; ++m) {
      if (item(m) >= S::kOutItems) continue;
      const int row0 = first_row(m);
      if (sh.row_pos[row0] < 0) continue;  // no row of this item in the tile
      const int c4 = (item(m) % S::kLanes) * 4;
      for (int k = 0; k < n; ++k) {
        const float4 lo = *reinterpret_cast<const float4*>(&sh.value[k][c4]);
        const float4 hi = *reinterpret_cast<const float4*>(&sh.value[k][kHeadSize / 2 + c4]);
#pragma unroll
        for (int i = 0; i < S::kOutRows; ++i) {
          float weight = sh.prob[k][row0 + i];
          if (mixed && (chunk + k >= sh.row_w0[row0 + i]) != full) weight = 0.0f;
          acc[m][i][0] = fmaf(weight, lo.x, acc[m][i][0]);
          acc[m][i][1] = fmaf(weight, lo.y, acc[m][i][1]);
          acc[m][i][2] = fmaf(weight, lo.z, acc[m][i][2]);
          acc[m][i][3] = fmaf(weight, lo.w, acc[m][i][3]);
          acc[m][i][4] = fmaf(weight, hi.x, acc[m][i][4]);
          acc[m][i][5] = fmaf(weight, hi.y, acc[m][i][5]);
          acc[m][i][6] = fmaf(weight, hi.z, acc[m][i][6]);
          acc[m][i][7] = fmaf(weight, hi.w, acc[m][i][7]);
        }
      }
    }
  }
};

// Loads the tile's query rows (pre-scaled) and the per-row positions; zeros for missing rows.
template <typename T, int kHeadSize, bool kDecode>
__device__ void load_tile_rows(const AttentionParams& p, const TileWork& w, AttentionShared<kHeadSize, kDecode>& sh) {
  using S = Tile<kHeadSize, kDecode>;
  const int group = p.num_q_heads / p.num_kv_heads;
  for (int item = threadIdx.x; item < S::kRows * S::kLanes; item += kAttnThreads) {
    const int r = item / S::kLanes;
    const int lane = item % S::kLanes;
    float x[kChannelsPerLane] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (r < w.num_rows) {
      const int64_t row = w.first_row + r;
      const T* src = static_cast<const T*>(p.query) + (w.s.start + row / group) * p.query_stride_token +
                     (w.kv_head * group + row % group) * p.query_stride_head + lane * kChannelsPerLane;
      load_row8(src, x);
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) x[c] *= p.scale;
    }
    float4* dst = reinterpret_cast<float4*>(&sh.q[r][lane * kChannelsPerLane]);
    dst[0] = make_float4(x[0], x[1], x[2], x[3]);
    dst[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
  if (threadIdx.x < S::kRows) {
    const int r = threadIdx.x;
    const int pos = r < w.num_rows ? w.s.first + int((w.first_row + r) / group) : -1;
    sh.row_pos[r] = pos;
    sh.row_w0[r] = pos >= 0 ? window_start(pos, p.block_size, p.format.residual_length) : INT_MAX;
    sh.row_max[r] = -INFINITY;
    sh.row_sum[r] = 0.0f;
  }
}

// Where the partial results of a split decode tile go: [slot][partition][D] accumulators, then
// [slot][partition][2] (running max, sum), slot = ((seq * tiles + tile) * H_kv + kv_head) * rows + row.
struct PartialLayout {
  float* out;
  float* stats;
  int parts;

  __device__ __forceinline__ PartialLayout(const AttentionLaunch& launch, int head_size) {
    const int64_t slots = int64_t(launch.p.seqs.num_seqs) * launch.plan.decode_tiles_per_seq *
                          launch.p.num_kv_heads * kDecodeRows;
    parts = launch.plan.num_partitions;
    out = launch.workspace;
    stats = launch.workspace + slots * parts * head_size;
  }

  __device__ __forceinline__ static int64_t slot(const AttentionLaunch& launch, int seq, int tile, int kv_head,
                                                 int row) {
    return ((int64_t(seq) * launch.plan.decode_tiles_per_seq + tile) * launch.p.num_kv_heads + kv_head) *
               kDecodeRows + row;
  }
};

// Writes the tile's rows: the normalized output, or (split) the partial accumulators and stats.
template <typename T, int kHeadSize, bool kDecode>
__device__ void write_tile(const AttentionLaunch& launch, const TileWork& w,
                           const AttentionShared<kHeadSize, kDecode>& sh, const Accumulator<kHeadSize, kDecode>& a) {
  using S = Tile<kHeadSize, kDecode>;
  using A = Accumulator<kHeadSize, kDecode>;
  const AttentionParams& p = launch.p;
  const int group = p.num_q_heads / p.num_kv_heads;
  const bool split = kDecode && launch.plan.num_partitions > 1;
  const PartialLayout partial(launch, kHeadSize);
#pragma unroll
  for (int m = 0; m < S::kOutItemsPerThread; ++m) {
    if (A::item(m) >= S::kOutItems) continue;
#pragma unroll
    for (int i = 0; i < S::kOutRows; ++i) {
      const int r = A::first_row(m) + i;
      if (r >= w.num_rows) continue;
      if (split) {
        float* dst = partial.out +
                     (PartialLayout::slot(launch, w.seq, w.tile, w.kv_head, r) * partial.parts + w.part) * kHeadSize;
#pragma unroll
        for (int c = 0; c < kChannelsPerLane; ++c) dst[A::channel(m, c)] = a.acc[m][i][c];
      } else {
        const int64_t row = w.first_row + r;
        T* dst = static_cast<T*>(p.out) + (w.s.start + row / group) * p.out_stride_token +
                 (w.kv_head * group + row % group) * p.out_stride_head;
        const float inv = sh.row_sum[r] > 0.0f ? 1.0f / sh.row_sum[r] : 0.0f;
#pragma unroll
        for (int c = 0; c < kChannelsPerLane; ++c) dst[A::channel(m, c)] = from_float<T>(a.acc[m][i][c] * inv);
      }
    }
  }
  if (split && threadIdx.x < w.num_rows) {
    float* stats =
        partial.stats +
        (PartialLayout::slot(launch, w.seq, w.tile, w.kv_head, threadIdx.x) * partial.parts + w.part) * 2;
    stats[0] = sh.row_max[threadIdx.x];
    stats[1] = sh.row_sum[threadIdx.x];
  }
}

template <typename T, int kHeadSize, bool kDecode>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_kernel(const AttentionLaunch launch) {
  using S = Tile<kHeadSize, kDecode>;
  const AttentionParams& p = launch.p;
  TileWork w;
  if (!locate_tile<kDecode, S::kRows>(launch, w)) return;
  auto& sh = dynamic_shared<AttentionShared<kHeadSize, kDecode>>();
  load_tile_rows<T, kHeadSize, kDecode>(p, w, sh);

  Accumulator<kHeadSize, kDecode> a;
#pragma unroll
  for (int m = 0; m < S::kOutItemsPerThread; ++m) {
#pragma unroll
    for (int i = 0; i < S::kOutRows; ++i) {
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) a.acc[m][i][c] = 0.0f;
    }
  }
  const int window = p.format.residual_length;
  const int w0_first = window_start(w.first_pos, p.block_size, window);  // every row reads keys below packed
  const int w0_last = window_start(w.last_pos, p.block_size, window);    // every row reads keys from here full
  __syncthreads();  // query rows, row state

  for (int chunk = w.key_begin; chunk < w.key_end; chunk += S::kKeys) {
    const int n = min(S::kKeys, w.key_end - chunk);
    const bool packed = chunk < w0_last;
    const bool full = window > 0 && chunk + n > w0_first;
    const bool mixed = packed && full;
    if (mixed) {  // scores from each source in turn
      stage_chunk<T, kHeadSize, kDecode>(launch, w, false, false, chunk, n, INT_MIN, w0_last, sh.key);
      __syncthreads();
      score_chunk<kHeadSize, kDecode>(sh, p.softcap, chunk, n, true, false);
      __syncthreads();
      stage_chunk<T, kHeadSize, kDecode>(launch, w, false, true, chunk, n, w0_first, INT_MAX, sh.key);
      __syncthreads();
      score_chunk<kHeadSize, kDecode>(sh, p.softcap, chunk, n, true, true);
    } else {
      stage_chunk<T, kHeadSize, kDecode>(launch, w, false, full, chunk, n, INT_MIN, INT_MAX, sh.key);
      stage_chunk<T, kHeadSize, kDecode>(launch, w, true, full, chunk, n, INT_MIN, INT_MAX, sh.value);
      __syncthreads();
      score_chunk<kHeadSize, kDecode>(sh, p.softcap, chunk, n, false, full);
    }
    __syncthreads();
    softmax_chunk<kHeadSize, kDecode>(sh);
    __syncthreads();
    a.scale_rows(sh.row_alpha);
    if (mixed) {
      stage_chunk<T, kHeadSize, kDecode>(launch, w, true, false, chunk, n, INT_MIN, w0_last, sh.value);
      __syncthreads();
      a.add_chunk(sh, chunk, n, true, false);
      __syncthreads();
      stage_chunk<T, kHeadSize, kDecode>(launch, w, true, true, chunk, n, w0_first, INT_MAX, sh.value);
      __syncthreads();
      a.add_chunk(sh, chunk, n, true, true);
    } else {
      a.add_chunk(sh, chunk, n, false, full);
    }
    __syncthreads();  // staged rows and probabilities are overwritten next
  }
  write_tile<T, kHeadSize, kDecode>(launch, w, sh, a);
}

// Merges the partitions of one decode tile: out = sum_p w_p acc_p / sum_p w_p l_p with
// w_p = exp(max_p - max); partitions whose keys a row does not see (max -inf) weigh nothing.
template <typename T, int kHeadSize>
__global__ void __launch_bounds__(kReduceThreads) reduce_partitions_kernel(const AttentionLaunch launch) {
  const AttentionParams& p = launch.p;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int seq = int(blockIdx.x / launch.plan.decode_tiles_per_seq);
  const int tile = int(blockIdx.x % launch.plan.decode_tiles_per_seq);
  const int kv_head = blockIdx.y;
  const SequenceRows s = checked_sequence_rows(p.seqs, seq);
  if (s.rows == 0 || s.rows > kDecodeMaxQuery) return;
  const int64_t first_row = int64_t(tile) * kDecodeRows;
  const int64_t total_rows = int64_t(s.rows) * group;
  if (first_row >= total_rows) return;
  const int num_rows = int(min(int64_t(kDecodeRows), total_rows - first_row));
  const int seq_len = s.first + s.rows;
  const PartialLayout partial(launch, kHeadSize);
  const int length = partition_length(seq_len, partial.parts);
  const int used = (seq_len + length - 1) / length;  // partitions that hold keys of this sequence

  __shared__ float weight[kDecodeRows][kMaxPartitions];
  __shared__ float inv_denominator[kDecodeRows];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int r = warp; r < num_rows; r += kReduceThreads / kWarpSize) {  // warp-uniform
    const float* stats = partial.stats + PartialLayout::slot(launch, seq, tile, kv_head, r) * partial.parts * 2;
    float m = -INFINITY;
    for (int i = lane; i < used; i += kWarpSize) m = fmaxf(m, stats[2 * i]);
    m = lanes_max(m, kWarpSize);
    float denominator = 0.0f;
    for (int i = lane; i < used; i += kWarpSize) {
      const float wgt = stats[2 * i] == -INFINITY ? 0.0f : expf(stats[2 * i] - m);
      weight[r][i] = wgt;
      denominator += wgt * stats[2 * i + 1];
    }
    denominator = lanes_sum(denominator, kWarpSize);
    if (lane == 0) inv_denominator[r] = denominator > 0.0f ? 1.0f / denominator : 0.0f;
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < num_rows * kHeadSize; idx += kReduceThreads) {
    const int r = idx / kHeadSize;
    const int d = idx % kHeadSize;
    const float* acc = partial.out + PartialLayout::slot(launch, seq, tile, kv_head, r) * partial.parts * kHeadSize;
    float sum = 0.0f;
    for (int i = 0; i < used; ++i) {
      if (weight[r][i] > 0.0f) sum += weight[r][i] * acc[int64_t(i) * kHeadSize + d];
    }
    const int64_t row = first_row + r;
    T* out = static_cast<T*>(p.out) + (s.start + row / group) * p.out_stride_token +
             (kv_head * group + row % group) * p.out_stride_head;
    out[d] = from_float<T>(sum * inv_denominator[r]);
  }
}

// Launches the kernels for one dtype: defined in paged_attention_launch.cuh, instantiated
// in paged_attention_<dtype>.cu. This header stays free of launch syntax.
template <typename T>
void launch_paged_attention_typed(const AttentionLaunch& launch, cudaStream_t stream);

}  // namespace kvtuner::cuda
