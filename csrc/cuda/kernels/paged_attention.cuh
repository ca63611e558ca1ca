// paged_attention: varlen attention of query rows over the packed cache, dequantizing K and V
// in registers (no dequantized copy is ever written). Semantics: kvtuner_vllm/format.py
// `paged_attention_ref` (query i of a sequence sits at position seq_len - q_len + i; causal,
// GQA, optional sliding window and softcap).
//
// Work split (flash-decoding): a block of 128 threads owns one row tile (up to kRows query
// rows = (query token, query head) pairs of one KV head; in decode, the GQA group), one KV
// head and one partition of the keys. It walks its keys in chunks of kChunk with an online
// softmax. With one partition it writes the output; otherwise it writes an unnormalized
// partial (accumulator, running max, sum) and reduce_partitions_kernel merges them.
//
// Thread mapping inside a block: teams of team_size(D) lanes, 8 channels per lane; team
// `slot` takes keys slot, slot + kSlots, ... of a chunk, so a warp reads consecutive tokens'
// codes contiguously. Scores: each lane dots its 8 channels with all rows, and a transposing
// butterfly (team_reduce_rows) sums the rows across the team in kRows - 1 + log2(team / 8)
// shuffles instead of kRows * log2(team). Values: each lane accumulates its 8 channels for
// all rows; the slots' accumulators are summed through shared memory at the end.
//
// Bit widths are runtime values, dispatched once per chunk to loops specialized for them:
// 4 score loops + 4 value loops per kernel instead of 16 kernels per (dtype, head size).
#pragma once

#include "cuda/kernels/api.h"
#include "cuda/kernels/common.cuh"

namespace kvtuner::cuda {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / kWarpSize;
constexpr int kRows = 8;     // query rows per block; team_reduce_rows assumes 8
constexpr int kChunk = 256;  // keys per pass through shared memory
constexpr int kReduceThreads = 128;
constexpr int kMaxPartitions = 256;

// One side (K or V) of a (block, head) plane.
struct PlaneSide {
  int64_t codes_offset, params_offset;  // bytes from the plane start
  int64_t code_bytes, param_bytes;      // per token
};

template <int kHeadSize>
struct AttentionShared {
  static constexpr int kSlots = kAttnThreads / team_size(kHeadSize);
  union __align__(16) {
    float logits[kChunk][kRows];            // scores, then softmax numerators, of one chunk
    float acc[kSlots][kRows][kHeadSize];    // per-slot accumulators, summed after the last chunk
  };
  float red_max[kAttnWarps][kRows], red_sum[kAttnWarps][kRows];
  float row_max[kRows], row_sum[kRows], row_alpha[kRows];
  int row_pos[kRows];  // position of each row's query token; -1: no row (sees no key)
};

// The row tiles of sequence s start at tile_begin(s) = floor(query_start_loc[s] * group / kRows)
// + s: monotone, at least ceil(q_len * group / kRows) tiles per sequence, and computable
// from query_start_loc alone (no prefix sum, no host sync). Some tiles stay empty.
__device__ __forceinline__ int64_t tile_begin(const int32_t* query_start_loc, int seq, int group) {
  return int64_t(query_start_loc[seq]) * group / kRows + seq;
}

__device__ __forceinline__ int find_seq(const int32_t* query_start_loc, int num_seqs, int group, int64_t tile) {
  int lo = 0, hi = num_seqs - 1;  // the last sequence whose first tile is <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_begin(query_start_loc, mid, group) <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sums v[r] over the team for all 8 rows. Each xor step trades half of the remaining rows
// with the partner lane, so after 3 steps lane l holds one row, row_of_lane(l), summed over
// 8 lanes; the remaining steps are plain butterflies. Every lane of the warp must call it.
template <int kTeam>
__device__ __forceinline__ float team_reduce_rows(float (&v)[kRows], int lane) {
  static_assert(kRows == 8 && kTeam >= 8, "the transposing butterfly takes 8 rows over >= 8 lanes");
#pragma unroll
  for (int half = kRows / 2, bit = 1; half >= 1; half /= 2, bit *= 2) {
    const bool upper = lane & bit;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float keep = upper ? v[i + half] : v[i];
      const float send = upper ? v[i] : v[i + half];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, bit);
    }
  }
#pragma unroll
  for (int offset = 8; offset < kTeam; offset *= 2) v[0] += __shfl_xor_sync(kFullMask, v[0], offset);
  return v[0];
}

// The row team_reduce_rows leaves in `lane`: lane bits 0, 1, 2 select row halves 4, 2, 1.
__device__ __forceinline__ int row_of_lane(int lane) { return (lane & 1) * 4 + (lane & 2) + ((lane >> 2) & 1); }

// Everything the chunk loops need about the block's work.
struct BlockWork {
  const uint8_t* head_cache;  // cache of this KV head in block 0
  const int32_t* blocks;      // this sequence's block table row
  int num_rows;
};

__device__ __forceinline__ const uint8_t* token_plane(const AttentionParams& p, const BlockWork& w, int token,
                                                      int* offset) {
  const int block = token / p.block_size;
  *offset = token - block * p.block_size;
  return w.head_cache + int64_t(w.blocks[block]) * p.cache_stride_block;
}

// Scores of keys [chunk, chunk + n) for all rows into sh.logits (masked: -inf).
template <typename T, int kHeadSize, int kBits>
__device__ void score_chunk(const AttentionParams& p, const BlockWork& w, const PlaneSide& side,
                            AttentionShared<kHeadSize>& sh, int chunk, int n,
                            const float (&q)[kRows][kChannelsPerLane], const float (&q_sum)[kRows]) {
  constexpr int kTeam = team_size(kHeadSize);
  constexpr int kSlots = kAttnThreads / kTeam;
  const int lane = threadIdx.x % kTeam;
  const int slot = threadIdx.x / kTeam;
  const bool lane_used = lane < kHeadSize / kChannelsPerLane;
  const int64_t param_offset = int64_t(lane * kChannelsPerLane / p.group_size) * kParamBytesPerGroup;
  const int row = row_of_lane(lane);
  const int pos = sh.row_pos[row];

  // Same trip count for every team of a warp: team_reduce_rows shuffles across the warp.
  for (int base = 0; base < n; base += kSlots) {
    const int i = base + slot;
    float dots[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) dots[r] = 0.0f;
    if (i < n && lane_used) {
      int offset;
      const uint8_t* plane = token_plane(p, w, chunk + i, &offset);
      const uint8_t* codes = plane + side.codes_offset + offset * side.code_bytes;
      float k[kChannelsPerLane];
      if constexpr (kBits == kUnquantizedBits) {
        load_raw<T>(codes + lane * kChannelsPerLane * sizeof(T), k);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < w.num_rows) {
#pragma unroll
            for (int c = 0; c < kChannelsPerLane; ++c) dots[r] = fmaf(q[r][c], k[c], dots[r]);
          }
        }
      } else {
        // q . (code * scale + zero) = scale * (q . code) + zero * sum(q)
        load_codes<kBits>(codes + lane * kBits, k);
        const float2 sz = load_scale_zero(plane + side.params_offset + offset * side.param_bytes + param_offset);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < w.num_rows) {
            float d = 0.0f;
#pragma unroll
            for (int c = 0; c < kChannelsPerLane; ++c) d = fmaf(q[r][c], k[c], d);
            dots[r] = fmaf(sz.x, d, sz.y * q_sum[r]);
          }
        }
      }
    }
    const float dot = team_reduce_rows<kTeam>(dots, lane);
    if (i < n && lane < kRows) {
      const int key = chunk + i;
      const bool visible = key <= pos && (p.sliding_window <= 0 || key > pos - p.sliding_window);
      const float score = p.softcap > 0.0f ? tanhf(dot / p.softcap) * p.softcap : dot;
      sh.logits[i][row] = visible ? score : -INFINITY;
    }
  }
}

// Online softmax over the chunk's logits: turns them into numerators exp(s - max) and
// updates each row's running max and sum; row_alpha rescales the accumulators.
template <int kHeadSize>
__device__ void softmax_chunk(AttentionShared<kHeadSize>& sh, int n) {
  constexpr int kStride = kAttnThreads / kRows;  // threads per row; tid % kRows is the row
  const int tid = threadIdx.x;
  const int r = tid % kRows;
  const int warp = tid / kWarpSize;
  const bool writer = tid % kWarpSize < kRows;

  float m = -INFINITY;
  for (int i = tid / kRows; i < n; i += kStride) m = fmaxf(m, sh.logits[i][r]);
  for (int offset = kRows; offset < kWarpSize; offset *= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
  if (writer) sh.red_max[warp][r] = m;
  __syncthreads();

  float chunk_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) chunk_max = fmaxf(chunk_max, sh.red_max[w][r]);
  const float old_max = sh.row_max[r];
  const float new_max = fmaxf(old_max, chunk_max);
  float s = 0.0f;
  for (int i = tid / kRows; i < n; i += kStride) {
    const float e = new_max == -INFINITY ? 0.0f : expf(sh.logits[i][r] - new_max);
    sh.logits[i][r] = e;
    s += e;
  }
  for (int offset = kRows; offset < kWarpSize; offset *= 2) s += __shfl_xor_sync(kFullMask, s, offset);
  if (writer) sh.red_sum[warp][r] = s;
  __syncthreads();

  if (tid < kRows) {
    float chunk_sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) chunk_sum += sh.red_sum[w][tid];
    const float alpha = old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
    sh.row_sum[tid] = sh.row_sum[tid] * alpha + chunk_sum;
    sh.row_max[tid] = new_max;
    sh.row_alpha[tid] = alpha;
  }
  __syncthreads();
}

// acc[r] += sum over the chunk's keys of p[r][key] * v[key] for this lane's 8 channels.
// Packed values: p * (code * scale + zero) = (p * scale) * code + p * zero, where the zero
// term is the same for the lane's 8 channels and accumulates separately in acc_zero.
template <typename T, int kHeadSize, int kBits>
__device__ void accumulate_chunk(const AttentionParams& p, const BlockWork& w, const PlaneSide& side,
                                 const AttentionShared<kHeadSize>& sh, int chunk, int n,
                                 float (&acc)[kRows][kChannelsPerLane], float (&acc_zero)[kRows]) {
  constexpr int kTeam = team_size(kHeadSize);
  constexpr int kSlots = kAttnThreads / kTeam;
  const int lane = threadIdx.x % kTeam;
  if (lane >= kHeadSize / kChannelsPerLane) return;
  const int64_t param_offset = int64_t(lane * kChannelsPerLane / p.group_size) * kParamBytesPerGroup;

  for (int i = threadIdx.x / kTeam; i < n; i += kSlots) {
    int offset;
    const uint8_t* plane = token_plane(p, w, chunk + i, &offset);
    const uint8_t* codes = plane + side.codes_offset + offset * side.code_bytes;
    const float4 p_lo = *reinterpret_cast<const float4*>(&sh.logits[i][0]);
    const float4 p_hi = *reinterpret_cast<const float4*>(&sh.logits[i][4]);
    const float prob[kRows] = {p_lo.x, p_lo.y, p_lo.z, p_lo.w, p_hi.x, p_hi.y, p_hi.z, p_hi.w};
    float v[kChannelsPerLane];
    if constexpr (kBits == kUnquantizedBits) {
      load_raw<T>(codes + lane * kChannelsPerLane * sizeof(T), v);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < w.num_rows) {
#pragma unroll
          for (int c = 0; c < kChannelsPerLane; ++c) acc[r][c] = fmaf(prob[r], v[c], acc[r][c]);
        }
      }
    } else {
      load_codes<kBits>(codes + lane * kBits, v);
      const float2 sz = load_scale_zero(plane + side.params_offset + offset * side.param_bytes + param_offset);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < w.num_rows) {
          const float weight = prob[r] * sz.x;
          acc_zero[r] = fmaf(prob[r], sz.y, acc_zero[r]);
#pragma unroll
          for (int c = 0; c < kChannelsPerLane; ++c) acc[r][c] = fmaf(weight, v[c], acc[r][c]);
        }
      }
    }
  }
}

template <typename T, int kHeadSize>
__device__ void score_chunk_dispatch(int bits, const AttentionParams& p, const BlockWork& w, const PlaneSide& side,
                                     AttentionShared<kHeadSize>& sh, int chunk, int n,
                                     const float (&q)[kRows][kChannelsPerLane], const float (&q_sum)[kRows]) {
  switch (bits) {
    case 2: return score_chunk<T, kHeadSize, 2>(p, w, side, sh, chunk, n, q, q_sum);
    case 4: return score_chunk<T, kHeadSize, 4>(p, w, side, sh, chunk, n, q, q_sum);
    case 8: return score_chunk<T, kHeadSize, 8>(p, w, side, sh, chunk, n, q, q_sum);
    default: return score_chunk<T, kHeadSize, kUnquantizedBits>(p, w, side, sh, chunk, n, q, q_sum);
  }
}

template <typename T, int kHeadSize>
__device__ void accumulate_chunk_dispatch(int bits, const AttentionParams& p, const BlockWork& w,
                                          const PlaneSide& side, const AttentionShared<kHeadSize>& sh, int chunk,
                                          int n, float (&acc)[kRows][kChannelsPerLane], float (&acc_zero)[kRows]) {
  switch (bits) {
    case 2: return accumulate_chunk<T, kHeadSize, 2>(p, w, side, sh, chunk, n, acc, acc_zero);
    case 4: return accumulate_chunk<T, kHeadSize, 4>(p, w, side, sh, chunk, n, acc, acc_zero);
    case 8: return accumulate_chunk<T, kHeadSize, 8>(p, w, side, sh, chunk, n, acc, acc_zero);
    default: return accumulate_chunk<T, kHeadSize, kUnquantizedBits>(p, w, side, sh, chunk, n, acc, acc_zero);
  }
}

template <typename T, int kHeadSize>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_kernel(const AttentionParams p) {
  constexpr int kTeam = team_size(kHeadSize);
  __shared__ AttentionShared<kHeadSize> sh;
  const int tid = threadIdx.x;
  const int lane = tid % kTeam;
  const int slot = tid / kTeam;
  const bool lane_used = lane < kHeadSize / kChannelsPerLane;

  // Which rows: blockIdx.x is a row tile of some sequence (see tile_begin).
  const int group = p.num_q_heads / p.num_kv_heads;
  const int seq = find_seq(p.query_start_loc, p.num_seqs, group, blockIdx.x);
  const int query_begin = p.query_start_loc[seq];
  const int query_len = p.query_start_loc[seq + 1] - query_begin;
  const int64_t tile = int64_t(blockIdx.x) - tile_begin(p.query_start_loc, seq, group);
  const int64_t first_row = tile * kRows;
  if (tile < 0 || first_row >= int64_t(query_len) * group) return;  // uniform: before any barrier
  const int num_rows = int(min(int64_t(kRows), int64_t(query_len) * group - first_row));
  const int kv_head = blockIdx.y;
  const int part = blockIdx.z;
  const int seq_len = p.seq_lens[seq];
  const int first_pos = seq_len - query_len + int(first_row / group);  // rows are in position order
  const int last_pos = seq_len - query_len + int((first_row + num_rows - 1) / group);

  // Which keys: the partition, cut to what the rows can see.
  int key_begin = part * p.partition_len;
  int key_end = p.num_partitions == 1 ? last_pos + 1 : min(last_pos + 1, key_begin + p.partition_len);
  if (p.sliding_window > 0) key_begin = max(key_begin, first_pos - p.sliding_window + 1);

  if (tid < kRows) {
    sh.row_pos[tid] = tid < num_rows ? seq_len - query_len + int((first_row + tid) / group) : -1;
    sh.row_max[tid] = -INFINITY;
    sh.row_sum[tid] = 0.0f;
  }

  // This lane's 8 channels of every row's query, pre-scaled, and their sums.
  float q[kRows][kChannelsPerLane], q_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    q_sum[r] = 0.0f;
    const int64_t row = first_row + r;
    const T* src = static_cast<const T*>(p.query) + (query_begin + row / group) * p.query_stride_token +
                   (kv_head * group + row % group) * p.query_stride_head + lane * kChannelsPerLane;
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) {
      q[r][c] = r < num_rows && lane_used ? to_float(src[c]) * p.scale : 0.0f;
      q_sum[r] += q[r][c];
    }
  }

  const PlaneLayout layout(p.key_bits, p.value_bits, kHeadSize, p.group_size, int(sizeof(T)), p.block_size);
  const PlaneSide key_side{0, layout.key_params_offset, layout.key_code_bytes, layout.key_param_bytes};
  const PlaneSide value_side{layout.value_codes_offset, layout.value_params_offset, layout.value_code_bytes,
                             layout.value_param_bytes};
  const BlockWork work{p.cache + kv_head * p.cache_stride_head, p.block_table + seq * p.block_table_stride,
                       num_rows};

  float acc[kRows][kChannelsPerLane], acc_zero[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    acc_zero[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) acc[r][c] = 0.0f;
  }
  __syncthreads();  // row_pos, row_max, row_sum

  for (int chunk = key_begin; chunk < key_end; chunk += kChunk) {
    const int n = min(kChunk, key_end - chunk);
    score_chunk_dispatch<T, kHeadSize>(p.key_bits, p, work, key_side, sh, chunk, n, q, q_sum);
    __syncthreads();
    softmax_chunk<kHeadSize>(sh, n);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float alpha = sh.row_alpha[r];
      acc_zero[r] *= alpha;
#pragma unroll
      for (int c = 0; c < kChannelsPerLane; ++c) acc[r][c] *= alpha;
    }
    accumulate_chunk_dispatch<T, kHeadSize>(p.value_bits, p, work, value_side, sh, chunk, n, acc, acc_zero);
    __syncthreads();  // logits are overwritten next
  }

  // Sum the slots' accumulators (sh.acc reuses the logits' memory: the loop ended on a barrier).
  if (lane_used) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < num_rows) {
        float4* dst = reinterpret_cast<float4*>(&sh.acc[slot][r][lane * kChannelsPerLane]);
        dst[0] = make_float4(acc[r][0] + acc_zero[r], acc[r][1] + acc_zero[r], acc[r][2] + acc_zero[r],
                             acc[r][3] + acc_zero[r]);
        dst[1] = make_float4(acc[r][4] + acc_zero[r], acc[r][5] + acc_zero[r], acc[r][6] + acc_zero[r],
                             acc[r][7] + acc_zero[r]);
      }
    }
  }
  __syncthreads();

  constexpr int kSlots = AttentionShared<kHeadSize>::kSlots;
  for (int idx = tid; idx < num_rows * kHeadSize; idx += kAttnThreads) {
    const int r = idx / kHeadSize;
    const int d = idx % kHeadSize;
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) sum += sh.acc[s][r][d];
    const int64_t row = first_row + r;
    const int64_t token = query_begin + row / group;
    const int64_t head = kv_head * group + row % group;
    if (p.num_partitions == 1) {
      const float row_sum = sh.row_sum[r];
      T* out = static_cast<T*>(p.out) + token * p.out_stride_token + head * p.out_stride_head;
      out[d] = from_float<T>(row_sum > 0.0f ? sum / row_sum : 0.0f);
    } else {
      p.partial_out[((token * p.num_q_heads + head) * p.num_partitions + part) * kHeadSize + d] = sum;
    }
  }
  if (p.num_partitions > 1 && tid < num_rows) {
    const int64_t row = first_row + tid;
    const int64_t token = query_begin + row / group;
    const int64_t head = kv_head * group + row % group;
    float* stats = p.partial_stats + ((token * p.num_q_heads + head) * p.num_partitions + part) * 2;
    stats[0] = sh.row_max[tid];
    stats[1] = sh.row_sum[tid];
  }
}

// Merges the partitions of one (query token, query head): out = sum_p w_p acc_p / sum_p w_p l_p
// with w_p = exp(max_p - max). Empty partitions (max -inf) weigh nothing.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) reduce_partitions_kernel(const AttentionParams p) {
  const int64_t token = blockIdx.x;
  const int head = blockIdx.y;
  if (token >= p.query_start_loc[p.num_seqs]) return;  // padding token: no partials
  const int parts = p.num_partitions;
  const int64_t first = (token * p.num_q_heads + head) * parts;
  const float* stats = p.partial_stats + first * 2;
  __shared__ float weight[kMaxPartitions];
  __shared__ float inv_denominator;

  if (threadIdx.x < kWarpSize) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < parts; i += kWarpSize) m = fmaxf(m, stats[2 * i]);
    for (int offset = 1; offset < kWarpSize; offset *= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
    float denominator = 0.0f;
    for (int i = threadIdx.x; i < parts; i += kWarpSize) {
      const float w = stats[2 * i] == -INFINITY ? 0.0f : expf(stats[2 * i] - m);
      weight[i] = w;
      denominator += w * stats[2 * i + 1];
    }
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      denominator += __shfl_xor_sync(kFullMask, denominator, offset);
    }
    if (threadIdx.x == 0) inv_denominator = denominator > 0.0f ? 1.0f / denominator : 0.0f;
  }
  __syncthreads();

  const float* partial = p.partial_out + first * p.head_size;
  T* out = static_cast<T*>(p.out) + token * p.out_stride_token + head * p.out_stride_head;
  for (int d = threadIdx.x; d < p.head_size; d += kReduceThreads) {
    float sum = 0.0f;
    for (int i = 0; i < parts; ++i) {
      if (weight[i] > 0.0f) sum += weight[i] * partial[int64_t(i) * p.head_size + d];
    }
    out[d] = from_float<T>(sum * inv_denominator);
  }
}

// Launches the kernels for one dtype: defined in paged_attention_launch.cuh, instantiated
// in paged_attention_<dtype>.cu. This header stays free of launch syntax.
template <typename T>
void launch_paged_attention_typed(const AttentionParams& p, int64_t num_tokens, cudaStream_t stream);

}  // namespace kvtuner::cuda
