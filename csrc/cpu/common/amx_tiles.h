// AMX tiles through inline assembly (the kernels' translation units need no AMX target flags):
// a tile configuration and the few instructions the prefill and decode kernels use. The asm
// statements that touch memory clobber it, so that the compiler keeps tile stores ahead of the
// vector code that reads them. Torch-free; the CPU must have AMX and the process its permission
// (prefill_attention.h: detected_matrix_unit).
#pragma once

#include <cstdint>

namespace kvtuner::cpu {

// Palette 1: per tile tmm0..tmm7 its rows (at most 16) and bytes per row (at most 64); all 16 x 64
// unless set otherwise.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  TileConfig() {
    for (int t = 0; t < 8; ++t) set(t, 16, 64);
  }

  void set(int tile, int tile_rows, int row_bytes) {
    rows[tile] = uint8_t(tile_rows);
    bytes_per_row[tile] = uint16_t(row_bytes);
  }
};

inline void amx_configure(const TileConfig& config) { asm volatile("ldtilecfg %0" ::"m"(config)); }
inline void amx_release() { asm volatile("tilerelease" ::: "memory"); }

}  // namespace kvtuner::cpu

// Tile numbers are part of the instruction, so these are macros; `stride` is in bytes.
#define KVT_TILE_LOAD(tile, base, stride) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #tile ::"r"(base), "r"(int64_t(stride)) : "memory")
#define KVT_TILE_STORE(tile, base, stride) \
  asm volatile("tilestored %%tmm" #tile ", (%0,%1,1)" ::"r"(base), "r"(int64_t(stride)) : "memory")
#define KVT_TILE_ZERO(tile) asm volatile("tilezero %%tmm" #tile ::)
#define KVT_TILE_DOT(acc, left, right) asm volatile("tdpbf16ps %%tmm" #right ", %%tmm" #left ", %%tmm" #acc ::)
