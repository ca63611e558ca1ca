// Host entry points of the CUDA kernels, free of torch headers: csrc/cuda/launchers.cu fills
// the shared parameter structs (kernel_params.h, via launcher_args.h), wraps them with what only
// the CUDA kernels need (a grid bound, the work split, debug-check bounds) and calls these
// functions; the kernel instantiations live in torch-free .cu files that compile in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_params.h"

namespace kvtuner::cuda {

using ::kvtuner::ElemType;

// quantize_and_cache: CacheWriteParams plus the block counts of the cache and the ring (debug
// checks only).
struct CacheWriteLaunch {
  CacheWriteParams p;
  int64_t num_cache_blocks, num_ring_blocks;
};

void launch_quantize_and_cache(const CacheWriteLaunch& launch, cudaStream_t stream);

// write_window: WindowWriteParams plus the grid bound (rows of key/value) and the ring's block count.
struct WindowWriteLaunch {
  WindowWriteParams p;
  int64_t num_rows;
  int64_t num_ring_blocks;  // debug checks only
};

void launch_write_window(const WindowWriteLaunch& launch, cudaStream_t stream);

// ------------------------------------------------------------------------------------------
// paged_attention work split (see paged_attention.cuh for the kernels)
//
// Two kernels share one body and split the sequences between them by query length:
// * the decode kernel takes sequences with q_len <= kDecodeMaxQuery (decode, speculative
//   decode, short chunks) in tiles of kDecodeRows (query token, query head) rows, and splits
//   their context into num_partitions partitions merged by a reduce kernel;
// * the prefill kernel takes the longer ones in tiles of 32-64 rows, unsplit.
// Every grid dimension is a function of (num_seqs, num_tokens, heads, head size,
// max_query_len) only: the kernels read seq_lens and query_start_loc on the device, and the
// partition length of each sequence is derived there from its own seq_len.
// ------------------------------------------------------------------------------------------

constexpr int kDecodeRows = 8;         // rows per decode tile: a GQA group of up to 8 heads
constexpr int kDecodeMaxQuery = 16;    // longest query the decode kernel takes
constexpr int kSplitTargetCtas = 1024;  // split until the decode grid has about this many blocks
constexpr int kMaxPartitions = 128;
constexpr int kPartitionGranule = 256;  // partition lengths are multiples of this many keys

// Rows per prefill tile: 64, or 32 for head size 256 (shared memory and registers).
constexpr int prefill_tile_rows(int head_size) { return head_size > 128 ? 32 : 64; }

struct AttentionPlan {
  int decode_tiles_per_seq;  // tiles of every sequence in the decode grid
  int num_partitions;        // context partitions of the decode kernel (1: no reduce)
  int64_t prefill_tiles;     // blocks along x of the prefill grid (0: not launched)
  int64_t workspace_bytes;   // partial results of the split (0 when num_partitions == 1)
};

// The plan of a batch; kvtuner_vllm/ops.py `attention_workspace_size` mirrors its workspace.
AttentionPlan plan_attention(int64_t num_tokens, int num_seqs, int num_q_heads, int num_kv_heads, int head_size,
                             int max_query_len);

struct AttentionLaunch {
  AttentionParams p;
  AttentionPlan plan;
  float* workspace;  // >= plan.workspace_bytes
  int64_t num_cache_blocks, num_ring_blocks;  // debug checks only
};

// True for the head sizes the attention kernels are instantiated for.
bool attention_supported(int head_size);

void launch_paged_attention(const AttentionLaunch& launch, cudaStream_t stream);

}  // namespace kvtuner::cuda
