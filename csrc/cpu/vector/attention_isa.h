// The vector kernel of one attention work item, compiled once per ISA (attention_avx512.cpp,
// attention_avx2.cpp, attention_baseline.cpp from attention_kernel.h); attention.cpp picks one
// when the library loads and owns the working memory, so that no standard container is
// compiled for a specific ISA.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cpu/common/work_plan.h"

namespace kvtuner::cpu {

// Tile order. An fp32 tile holds each run of 16 code bytes in *storage order* rather than
// channel order: lane j of every byte first (for 4 bits the 16 low nibbles, then the 16 high
// ones; for 2 bits four vectors of 2-bit lanes). Unpacking is then elementwise vector code with
// no shuffles. The query rows are permuted the same way (a dot product does not care about the
// order), the full-precision window rows are loaded into it, and the value accumulators are put
// back in channel order once per item. A run is 16 bytes = 16, 32 or 64 channels; a shorter
// last run (head sizes 80, 96) is laid out the same way with fewer bytes.
constexpr int kRunBytes = 16;

// Tile position of channel `c` for codes of `bits` bits (the identity for 8 and 16 bits).
inline int tile_position(int bits, int head_size, int c) {
  if (bits >= 8) return c;
  const int per_byte = 8 / bits, run_channels = kRunBytes * per_byte;
  const int base = c / run_channels * run_channels, w = c - base;
  const int run_bytes = std::min(run_channels, head_size - base) / per_byte;
  return base + (w % per_byte) * run_bytes + w / per_byte;
}

// Keys per chunk: about 2048 / D, so that a K and a V tile of chunk x D floats stay in L1
// together with the rows they update.
inline int chunk_tokens(int head_size) { return std::clamp(2048 / head_size, 16, 64); }

// Per-thread working memory of one item (sizes for `rows` query rows, head size D, `chunk` keys).
struct ItemScratch {
  float* query;                              // [rows][D], in the keys' tile order, scaled
  float* acc;                                // [rows][D], in the values' tile order
  float *max, *sum;                          // [rows]: online softmax state
  int *packed_end, *full_begin, *full_end;   // [rows]: each row's key ranges
  float *keys, *values;                      // [chunk][D] tiles
  float* scores;                             // [chunk]: one row's scores, then probabilities
  float* params;                             // [chunk * D / 8]: per-token scales and zeros as floats
  float *channel_scale, *channel_zero;       // [D]: kivi params of one token group, tile order
  float* row;                                // [2D]: one row in channel order
  const int *key_order, *value_order;        // [D]: tile position of each channel
  uint8_t* matrix;                           // kDecodeWorkspaceBytes, 64-byte aligned: amx/decode_attention.cpp's
};

// The AMX decode kernel (amx/decode_attention.cpp): query rows per item it takes at most, and its
// workspace per thread.
constexpr int kMaxDecodeRows = 16;
constexpr size_t kDecodeWorkspaceBytes = size_t(256) << 10;

// Whether the AMX decode kernel takes items of `rows` query rows of this step (bfloat16, keys
// and values both packed, per-token groups or kivi keys, no softcap); the caller checks the CPU.
bool decode_amx_takes(const AttentionParams& params, int rows);
void run_work_item_amx(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                       float* partial);

void run_work_item_avx512(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                          float* partial);
void run_work_item_avx2(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                        float* partial);
void run_work_item_baseline(const AttentionParams& params, const WorkItem& item, const ItemScratch& scratch,
                            float* partial);

}  // namespace kvtuner::cpu
