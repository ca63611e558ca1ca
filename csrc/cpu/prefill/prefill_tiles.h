// Filling the key and value tiles of prefill attention: packed tokens dequantized to bfloat16
// rows, rows of the model dtype copied, and the rows rearranged into the VNNI layouts of
// prefill_matmul.h. Included by prefill_attention.cpp inside its AVX-512 target region only.
//
// Dequantization follows reference.dequantize: x = code * float(scale) + float(zero) in fp32.
// Values are rounded to bfloat16 (round to nearest even) for the matrix units. Keys of
// quantized planes are split into two bfloat16 rows, hi = bf16(x) and lo = bf16(x - hi), stored
// side by side ([hi D | lo D]): a score q.hi + q.lo (q doubled to [q | q]) carries x to 16
// significant bits, so scores keep the fp32 reference's accuracy where one bf16 rounding of the
// keys alone would move them by up to 2^-9 |q||k|.
#pragma once

#if !defined(KVT_PREFILL_TARGET_REGION)
#error "prefill_tiles.h belongs inside prefill_attention.cpp's AVX-512 target region"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/prefill/prefill_matmul.h"

namespace kvtuner::cpu::prefill {

// ---------------------------------------------------------------------------------------
// Codes -> fp32, 32 channels at a time
// ---------------------------------------------------------------------------------------

// Codes of channels [c, c + 32) of one token row, one byte each in channel order. Codes sit
// little end first: 4 bits, channel 2i in the low nibble of byte i; 2 bits, channel 4i + k
// in bits 2k..2k+1 of byte i.
template <int kBits>
inline __m256i channel_codes(const uint8_t* row, int c) {
  if constexpr (kBits == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
  } else if constexpr (kBits == 4) {  // byte i -> word i = (low nibble, high nibble)
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
    return _mm256_or_si256(_mm256_and_si256(bytes, _mm256_set1_epi16(0x000f)),
                           _mm256_and_si256(_mm256_slli_epi16(bytes, 4), _mm256_set1_epi16(0x0f00)));
  } else {  // byte i -> dword i = its four 2-bit fields, one per byte
    int64_t word;
    std::memcpy(&word, row + c / 4, 8);
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(word));
    __m256i codes = _mm256_and_si256(bytes, _mm256_set1_epi32(0x3));
    codes = _mm256_or_si256(codes, _mm256_and_si256(_mm256_slli_epi32(bytes, 6), _mm256_set1_epi32(0x300)));
    codes = _mm256_or_si256(codes, _mm256_and_si256(_mm256_slli_epi32(bytes, 12), _mm256_set1_epi32(0x30000)));
    return _mm256_or_si256(codes, _mm256_and_si256(_mm256_slli_epi32(bytes, 18), _mm256_set1_epi32(0x3000000)));
  }
}

// The fp32 codes of channels [c, c + 16) and [c + 16, c + 32).
template <int kBits>
inline void codes_to_float(const uint8_t* row, int c, __m512* low, __m512* high) {
  const __m256i codes = channel_codes<kBits>(row, c);
  *low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes)));
  *high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1)));
}

inline __m512 widen_bf16(__m256i bf) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf), 16)); }

// Two fp32 vectors (channels c..c+15, c+16..c+31) -> 32 bf16 at `out`; with kSplit also the
// remainders x - bf16(x), rounded, at out + head_size.
template <bool kSplit>
inline void store_bf16x32(uint16_t* out, int head_size, __m512 low, __m512 high) {
  const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(high, low);
  _mm512_storeu_si512(out, hi);
  if constexpr (kSplit) {
    const __m512 low_rest = _mm512_sub_ps(low, widen_bf16(_mm512_castsi512_si256(hi)));
    const __m512 high_rest = _mm512_sub_ps(high, widen_bf16(_mm512_extracti64x4_epi64(hi, 1)));
    _mm512_storeu_si512(out + head_size, (__m512i)_mm512_cvtne2ps_pbh(high_rest, low_rest));
  }
}

// ---------------------------------------------------------------------------------------
// Packed tokens -> bf16 rows [n][D]
// ---------------------------------------------------------------------------------------

// Per-token groups of `group_size` channels (a multiple of 32), params [scale, zero] per group
// (at most 8 groups: D <= 256). Output rows are `pitch` elements apart.
template <int kBits, bool kSplit>
inline void dequantize_token_rows(const uint8_t* codes, const uint8_t* params, int count, int head_size,
                                  int group_size, uint16_t* out, int pitch) {
  const int code_bytes = head_size * kBits / 8;
  const int groups = head_size / group_size;
  const __mmask16 param_halves = __mmask16((1u << (2 * groups)) - 1);  // masked: never reads past the row
  for (int t = 0; t < count; ++t) {
    const uint8_t* row = codes + int64_t(t) * code_bytes;
    const __m512 row_params =  // [scale_0, zero_0, scale_1, zero_1, ...]
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(param_halves, params + int64_t(t) * groups * 4));
    for (int c = 0; c < head_size; c += 32) {
      const int group = c / group_size;
      const __m512 scale = _mm512_permutexvar_ps(_mm512_set1_epi32(2 * group), row_params);
      const __m512 zero = _mm512_permutexvar_ps(_mm512_set1_epi32(2 * group + 1), row_params);
      __m512 low, high;
      codes_to_float<kBits>(row, c, &low, &high);
      store_bf16x32<kSplit>(out + int64_t(t) * pitch + c, head_size, _mm512_fmadd_ps(low, scale, zero),
                            _mm512_fmadd_ps(high, scale, zero));
    }
  }
}

// Kivi keys: one token group's per-channel (scale, zero) fp16 pairs -> fp32 vectors.
inline void load_channel_params(const uint8_t* pairs, int head_size, float* scale, float* zero) {
  for (int c = 0; c < head_size; c += 16) {
    const __m512i words = _mm512_loadu_si512(pairs + 4 * c);
    _mm512_storeu_ps(scale + c, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words)));
    _mm512_storeu_ps(zero + c, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16))));
  }
}

template <int kBits>
inline void dequantize_channel_rows(const uint8_t* codes, const float* scale, const float* zero, int count,
                                    int head_size, uint16_t* out, int pitch) {
  const int code_bytes = head_size * kBits / 8;
  for (int t = 0; t < count; ++t) {
    const uint8_t* row = codes + int64_t(t) * code_bytes;
    for (int c = 0; c < head_size; c += 32) {
      __m512 low, high;
      codes_to_float<kBits>(row, c, &low, &high);
      store_bf16x32<true>(out + int64_t(t) * pitch + c, head_size,
                          _mm512_fmadd_ps(low, _mm512_loadu_ps(scale + c), _mm512_loadu_ps(zero + c)),
                          _mm512_fmadd_ps(high, _mm512_loadu_ps(scale + c + 16), _mm512_loadu_ps(zero + c + 16)));
    }
  }
}

// One side (K or V) of a (block, head) plane, as the dequantizers read it.
struct PlaneSide {
  int64_t codes_offset, params_offset;
  int bits;
  int token_group;  // kivi keys: positions per (scale, zero) row; 0: per-token groups
  bool split;       // keys of a quantized plane: [hi | lo] rows of 2D (see the top of this file)
};

template <bool kSplit>
inline void dequantize_token_side(const uint8_t* codes, const uint8_t* params, int bits, int count, int head_size,
                                  int group_size, uint16_t* out, int pitch) {
  switch (bits) {
    case 2: dequantize_token_rows<2, kSplit>(codes, params, count, head_size, group_size, out, pitch); return;
    case 4: dequantize_token_rows<4, kSplit>(codes, params, count, head_size, group_size, out, pitch); return;
    default: dequantize_token_rows<8, kSplit>(codes, params, count, head_size, group_size, out, pitch); return;
  }
}

// Tokens [first, first + count) of one plane side -> bf16 rows `pitch` elements apart (2D for
// split keys). 16-bit planes hold bf16 rows.
inline void dequantize_plane(const uint8_t* plane, const PlaneSide& side, int first, int count, int head_size,
                             int group_size, float* channel_scale, float* channel_zero, uint16_t* out, int pitch) {
  const int code_bytes = side.bits == 16 ? head_size * 2 : head_size * side.bits / 8;
  const uint8_t* codes = plane + side.codes_offset + int64_t(first) * code_bytes;
  if (side.bits == 16) {
    for (int t = 0; t < count; ++t) std::memcpy(out + int64_t(t) * pitch, codes + int64_t(t) * code_bytes, code_bytes);
    return;
  }
  if (side.token_group == 0) {
    const uint8_t* params = plane + side.params_offset + int64_t(first) * (head_size / group_size * 4);
    if (side.split) {
      dequantize_token_side<true>(codes, params, side.bits, count, head_size, group_size, out, pitch);
    } else {
      dequantize_token_side<false>(codes, params, side.bits, count, head_size, group_size, out, pitch);
    }
    return;
  }
  // Kivi keys (always split): the run is cut at token-group ends, each group with its own
  // per-channel params.
  for (int t = 0; t < count;) {
    const int position = first + t;
    const int group = position / side.token_group;
    const int run = std::min(count - t, (group + 1) * side.token_group - position);
    load_channel_params(plane + side.params_offset + int64_t(group) * 4 * head_size, head_size, channel_scale,
                        channel_zero);
    const uint8_t* run_codes = codes + int64_t(t) * code_bytes;
    uint16_t* run_out = out + int64_t(t) * pitch;
    switch (side.bits) {
      case 2: dequantize_channel_rows<2>(run_codes, channel_scale, channel_zero, run, head_size, run_out, pitch); break;
      case 4: dequantize_channel_rows<4>(run_codes, channel_scale, channel_zero, run, head_size, run_out, pitch); break;
      default: dequantize_channel_rows<8>(run_codes, channel_scale, channel_zero, run, head_size, run_out, pitch); break;
    }
    t += run;
  }
}

// ---------------------------------------------------------------------------------------
// bf16 rows -> VNNI layouts
// ---------------------------------------------------------------------------------------

// In-place transpose of a 16x16 matrix of 32-bit words held in 16 registers.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4i + j] now holds, in each 128-bit lane l, words (4i..4i+3, column 4l + j).
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// key rows [width][depth] bf16 -> the keys tiles of prefill_matmul.h: each 16 x 16 block of
// (key, channel pair) words, transposed, is one tile.
inline void pack_keys(const uint16_t* rows, int depth, int width, uint32_t* keys) {
  for (int n = 0; n < width; n += 16) {
    for (int c = 0; c < depth / 2; c += 16) {
      __m512i block[16];
      for (int i = 0; i < 16; ++i) block[i] = _mm512_loadu_si512(rows + int64_t(n + i) * depth + 2 * c);
      transpose16x16(block);
      uint32_t* tile = keys + tiled(c, n / 16, kKeyBlocks, 16);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(tile + 16 * i, block[i]);
    }
  }
}

// value rows [width][D] bf16 -> the values tiles of prefill_matmul.h (key pairs per channel).
inline void pack_values(const uint16_t* rows, int head_size, int width, uint32_t* values) {
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int n = 0; n < width; n += 2) {
    const uint16_t* even = rows + int64_t(n) * head_size;
    const uint16_t* odd = even + head_size;
    for (int c = 0; c < head_size; c += 32) {
      const __m512i a = _mm512_loadu_si512(even + c), b = _mm512_loadu_si512(odd + c);
      _mm512_storeu_si512(values + tiled(n / 2, c / 16, head_size / 16, 16), _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(values + tiled(n / 2, c / 16 + 1, head_size / 16, 16), _mm512_permutex2var_epi16(a, high, b));
    }
  }
}

}  // namespace kvtuner::cpu::prefill
