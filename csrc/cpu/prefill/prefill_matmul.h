// The two matrix products of prefill attention, on AMX tiles or AVX512-BF16 dot products, and
// the tiled layouts they read and write. Included by prefill_attention.cpp inside its AVX-512
// target region only.
//
// Both products take bfloat16 inputs and accumulate in fp32. The right operands are in the
// "VNNI" layout the units read: pairs of consecutive reduction indices packed into one 32-bit
// word,
//   keys:   k2[c / 2][n] = (k[n][c], k[n][c + 1])     (scores = q . k over `depth` channels)
//   values: v2[n / 2][d] = (v[n][d], v[n + 1][d])     (acc += p . v over `width` keys)
// Every operand is stored as contiguous 16-row x 64-byte tiles (the AMX tile shape), so a tile
// load reads 1 KiB in one piece: row-major strides of 256 or 512 bytes put the rows of the
// operands in the same few cache sets and cost AMX half its speed. A buffer is a grid of tiles,
// `tiles` per 16-row band; `tiled(r, t, tiles, row)` is where row r of tile column t starts
// (`row` elements per tile row):
//   query  [rows/16][depth/32] tiles, 16 rows x 32 bf16          (left of scores)
//   keys   [depth/32][kKeyBlocks] tiles, 16 pair rows x 16 words (right of scores)
//   scores [rows/16][kKeyBlocks] tiles, 16 rows x 16 fp32        (result of scores)
//   probs  [rows/16][kProbBlocks] tiles, 16 rows x 32 bf16       (left of P.V)
//   values [kMaxKeyTile/32][D/16] tiles, 16 pair rows x 16 words (right of P.V)
//   acc    [rows/16][D/16] tiles, 16 rows x 16 fp32              (result of P.V)
// Rows come in multiples of 16 (the caller pads them); D is a multiple of 32.
#pragma once

#if !defined(KVT_PREFILL_TARGET_REGION)
#error "prefill_matmul.h belongs inside prefill_attention.cpp's AVX-512 target region"
#endif

#include <immintrin.h>

#include <cstdint>

#include "cpu/common/amx_tiles.h"

namespace kvtuner::cpu::prefill {

// Keys per tile, at most. A tile's width is a multiple of 32 (one reduction step of P.V).
constexpr int kMaxKeyTile = 128;
constexpr int kKeyBlocks = kMaxKeyTile / 16;   // 16-key tile columns of scores and keys
constexpr int kProbBlocks = kMaxKeyTile / 32;  // 32-key tile columns of probs
constexpr int kTileBytes = 1024;

inline int64_t tiled(int r, int t, int tiles, int row) {
  return (int64_t(r >> 4) * tiles + t) * 16 * row + (r & 15) * row;
}

// Keys [begin, end) of a tile, multiples of 32: the columns of scores, the reduction of P.V.
struct KeyRange {
  int begin, end;
};

// ---------------------------------------------------------------------------------------
// AMX (amx_tiles.h): tmm0-3 accumulate (2 x 2 tiles), tmm4-5 hold left tiles, tmm6-7 right
// tiles, all 16 rows x 64 bytes.
// ---------------------------------------------------------------------------------------

inline void amx_begin() {
  static const TileConfig config;  // every tile 16 rows x 64 bytes
  amx_configure(config);
}

// Where the tiles of one product lie (byte offsets between tiles).
struct TileGrid {
  int64_t left_band;   // from a left tile to the one 16 rows down
  int64_t left_step;   // to the next reduction step
  int64_t right_step;  // from a right tile to the next reduction step (the next column is +1 tile)
  int64_t out_band;    // from a result tile to the one 16 rows down (the next column is +1 tile)
};

// One or two 16-row bands x 32 result columns: C (+)= sum over `steps` of A . B.
template <bool kTwoBands, bool kAccumulate>
inline void amx_block(const uint8_t* a, const uint8_t* b, uint8_t* c, int steps, const TileGrid& g) {
  uint8_t* c_low = c + g.out_band;
  if constexpr (kAccumulate) {
    KVT_TILE_LOAD(0, c, 64);
    KVT_TILE_LOAD(1, c + kTileBytes, 64);
    if constexpr (kTwoBands) {
      KVT_TILE_LOAD(2, c_low, 64);
      KVT_TILE_LOAD(3, c_low + kTileBytes, 64);
    }
  } else {
    KVT_TILE_ZERO(0);
    KVT_TILE_ZERO(1);
    if constexpr (kTwoBands) {
      KVT_TILE_ZERO(2);
      KVT_TILE_ZERO(3);
    }
  }
  for (int s = 0; s < steps; ++s) {
    const uint8_t* left = a + s * g.left_step;
    const uint8_t* right = b + s * g.right_step;
    KVT_TILE_LOAD(4, left, 64);
    KVT_TILE_LOAD(6, right, 64);
    KVT_TILE_DOT(0, 4, 6);
    KVT_TILE_LOAD(7, right + kTileBytes, 64);
    KVT_TILE_DOT(1, 4, 7);
    if constexpr (kTwoBands) {
      KVT_TILE_LOAD(5, left + g.left_band, 64);
      KVT_TILE_DOT(2, 5, 6);
      KVT_TILE_DOT(3, 5, 7);
    }
  }
  KVT_TILE_STORE(0, c, 64);
  KVT_TILE_STORE(1, c + kTileBytes, 64);
  if constexpr (kTwoBands) {
    KVT_TILE_STORE(2, c_low, 64);
    KVT_TILE_STORE(3, c_low + kTileBytes, 64);
  }
}

// `bands` 16-row bands (from a and c on) x `column_pairs` pairs of result tile columns.
template <bool kAccumulate>
inline void amx_product(const uint8_t* a, const uint8_t* b, uint8_t* c, int steps, int column_pairs,
                        const TileGrid& g, int bands) {
  int band = 0;
  for (; band + 2 <= bands; band += 2) {
    for (int pair = 0; pair < column_pairs; ++pair) {
      amx_block<true, kAccumulate>(a + band * g.left_band, b + 2 * pair * kTileBytes,
                                   c + band * g.out_band + 2 * pair * kTileBytes, steps, g);
    }
  }
  if (band < bands) {
    for (int pair = 0; pair < column_pairs; ++pair) {
      amx_block<false, kAccumulate>(a + band * g.left_band, b + 2 * pair * kTileBytes,
                                    c + band * g.out_band + 2 * pair * kTileBytes, steps, g);
    }
  }
}

// scores[r][n] = q[r] . k[n] over `depth` channels for `bands` x 16 rows (query and scores point
// at their first band), keys n in `keys_range`. The query buffer holds `query_depth` channels per row.
inline void amx_scores(const uint16_t* query, int query_depth, const uint32_t* keys, int depth, KeyRange keys_range,
                       float* scores, int bands) {
  const int query_steps = query_depth / 32;
  const TileGrid g{int64_t(query_steps) * kTileBytes, kTileBytes, int64_t(kKeyBlocks) * kTileBytes,
                   int64_t(kKeyBlocks) * kTileBytes};
  const int64_t skip = int64_t(keys_range.begin / 32) * 2 * kTileBytes;  // two 16-key tiles per 32 keys
  amx_product<false>(reinterpret_cast<const uint8_t*>(query), reinterpret_cast<const uint8_t*>(keys) + skip,
                     reinterpret_cast<uint8_t*>(scores) + skip, depth / 32, (keys_range.end - keys_range.begin) / 32,
                     g, bands);
}

// acc[r][d] += sum_{n in keys_range} probs[r][n] * v[n][d] for `bands` x 16 rows (probs and acc point
// at their first band).
inline void amx_accumulate(const uint16_t* probs, const uint32_t* values, int head_size, KeyRange keys_range,
                           float* acc, int bands) {
  const int64_t channel_tiles = head_size / 16;
  const TileGrid g{int64_t(kProbBlocks) * kTileBytes, kTileBytes, channel_tiles * kTileBytes,
                   channel_tiles * kTileBytes};
  const int skip = keys_range.begin / 32;  // reduction steps
  amx_product<true>(reinterpret_cast<const uint8_t*>(probs) + skip * g.left_step,
                    reinterpret_cast<const uint8_t*>(values) + skip * g.right_step, reinterpret_cast<uint8_t*>(acc),
                    (keys_range.end - keys_range.begin) / 32, head_size / 32, g, bands);
}

// ---------------------------------------------------------------------------------------
// AVX512-BF16: vdpbf16ps adds a[2i] * b[2i] + a[2i+1] * b[2i+1] into fp32 lane i, so a row of a
// right tile is one operand and each left pair is broadcast. Four rows x four right vectors
// (16 accumulators) share the loads; the loops walk the same tiles as AMX.
// ---------------------------------------------------------------------------------------

inline __m512bh as_bf16(__m512i v) { return (__m512bh)v; }

// C[4 rows][vecs x 16 columns] (+)= sum over `steps` tiles of A . B: `left[i]` is row i of the
// first left tile, `right` the first right tile of the columns, `out[i]` row i of the first
// result tile; consecutive left tiles lie `left_step` words apart, right tiles `right_step`,
// columns one tile (256 words) apart.
template <int kVecs>
inline void dot_block(const uint32_t* const left[4], int64_t left_step, const uint32_t* right, int64_t right_step,
                      int steps, float* const out[4], bool accumulate) {
  __m512 acc[4][kVecs];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < kVecs; ++v) acc[i][v] = accumulate ? _mm512_loadu_ps(out[i] + 256 * v) : _mm512_setzero_ps();
  for (int s = 0; s < steps; ++s) {
    const uint32_t* b = right + s * right_step;
    for (int k = 0; k < 16; ++k) {
      __m512i column[kVecs];
      for (int v = 0; v < kVecs; ++v) column[v] = _mm512_loadu_si512(b + 256 * v + 16 * k);
      for (int i = 0; i < 4; ++i) {
        const __m512i pair = _mm512_set1_epi32(int(left[i][s * left_step + k]));
        for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], as_bf16(pair), as_bf16(column[v]));
      }
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(out[i] + 256 * v, acc[i][v]);
}

// The tile grid of prefill_matmul's layouts, walked four rows and up to four result tiles at a
// time: `left_tiles`/`out_tiles` tiles per 16-row band, right tiles `right_step` words apart per
// reduction step; columns [first_column, end_column) in 16-column tiles.
inline void dot_product(const uint16_t* left, int left_tiles, const uint32_t* right, int64_t right_step,
                        float* out, int out_tiles, int first_step, int steps, int first_column, int end_column,
                        int bands, bool accumulate) {
  for (int r = 0; r < 16 * bands; r += 4) {
    const uint32_t* rows[4];
    float* outs[4];
    for (int i = 0; i < 4; ++i) {
      rows[i] = reinterpret_cast<const uint32_t*>(left + tiled(r + i, first_step, left_tiles, 32));
    }
    for (int column = first_column; column < end_column; column += 4) {
      for (int i = 0; i < 4; ++i) outs[i] = out + tiled(r + i, column, out_tiles, 16);
      const uint32_t* b = right + int64_t(first_step) * right_step + 256 * column;
      switch (end_column - column < 4 ? end_column - column : 4) {
        case 4: dot_block<4>(rows, 256, b, right_step, steps, outs, accumulate); break;
        case 3: dot_block<3>(rows, 256, b, right_step, steps, outs, accumulate); break;
        case 2: dot_block<2>(rows, 256, b, right_step, steps, outs, accumulate); break;
        default: dot_block<1>(rows, 256, b, right_step, steps, outs, accumulate); break;
      }
    }
  }
}

inline void dot_scores(const uint16_t* query, int query_depth, const uint32_t* keys, int depth, KeyRange keys_range,
                       float* scores, int bands) {
  dot_product(query, query_depth / 32, keys, int64_t(kKeyBlocks) * 256, scores, kKeyBlocks, 0, depth / 32,
              keys_range.begin / 16, keys_range.end / 16, bands, false);
}

inline void dot_accumulate(const uint16_t* probs, const uint32_t* values, int head_size, KeyRange keys_range,
                           float* acc, int bands) {
  const int channel_tiles = head_size / 16;
  dot_product(probs, kProbBlocks, values, int64_t(channel_tiles) * 256, acc, channel_tiles, keys_range.begin / 32,
              (keys_range.end - keys_range.begin) / 32, 0, channel_tiles, bands, true);
}

}  // namespace kvtuner::cpu::prefill
