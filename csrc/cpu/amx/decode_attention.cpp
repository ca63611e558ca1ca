// The decode kernel on AMX (attention_isa.h: run_work_item_amx): short-query items of bfloat16
// models whose keys and values are both packed (per-token groups or kivi keys), with the exact v2
// semantics of reference.paged_attention_ref. The vector kernel dequantizes every key and value to
// fp32 and spends its time on that and on per-row dot products; here the codes themselves are the
// matrix operands, and the scales and zeros move to the side that is small:
//
//   score(r, t) = sum_g s[t,g] * (q_r . codes_t)|g + z[t,g] * sum(q_r|g)
//                  -- Q.codes^T on AMX: left = 16 keys x 32 codes as bf16 (integers up to 255
//                     are exact in bf16), right = the query rows split by group (exact: the
//                     query is bf16); scales applied per key afterwards, in fp32. Kivi keys'
//                     per-channel scales go into the query instead (load_kivi_query).
//   out(r, c)    = sum_t (p[r,t] * s[t,g(c)]) * code[t,c] + sum_t p[r,t] * z[t,g(c)]
//                  -- P'.codes on AMX: left = p * s per value group as bf16 (for 2- and 4-bit
//                     values the one rounding this kernel adds, 2^-9 relative per weight, as
//                     the prefill kernel and vLLM's own bf16 path round their probabilities;
//                     8-bit values take two bf16 parts, kSplitWeights), right = value codes as
//                     bf16 in VNNI pairs; the zeros' share summed apart in fp32.
// Value codes enter centred (kMidpoint), which keeps the weights' rounding as small as rounding p
// times the values would be; key codes enter as 128 + code (kKeyOffset), which costs no lookup.
//
// Keys are taken 16 at a time (a "slot", inside one block), from the pages or from the window's
// rows (bf16 as they are, scale 1, zero 0), and collected into spans of kSpanSlots slots; each
// span updates the online softmax once and adds its values. No dequantized key or value is ever
// stored. The rows' key ranges, the window's row addresses and the output are the vector
// kernel's own code (attention_kernel.h).
#include "cpu/vector/attention_isa.h"
#include "cpu/common/simd.h"

#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx512bf16,avx2,avx,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#pragma GCC target("prefer-vector-width=512")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own intrinsics' placeholders
#define KVT_ISA_AVX512 1
#define KVT_DECODE_AMX 1
#endif

#include "cpu/common/amx_tiles.h"
#include "cpu/vector/attention_kernel.h"
#include "cpu/common/exp2_avx512.h"

namespace kvtuner::cpu {

#if KVT_DECODE_AMX
namespace {

constexpr int kSlot = 16;      // keys per score tile
constexpr int kSpanSlots = 4;  // slots per softmax update
constexpr int kSpan = kSlot * kSpanSlots;
// P'.V steps per span, at most: one per slot where the weights are split into two bf16 parts
// (8-bit values), else one per two slots.
constexpr int kSteps = kSpanSlots;

// 8-bit values keep their weights to ~16 significant bits (hi + lo bf16 parts): their own
// quantization error is small enough that one bf16 rounding of p * scale would double it. At 4 and
// 2 bits it is far below the codes' error, and one rounding saves half the products.
template <int kValueBits>
constexpr bool kSplitWeights = kValueBits == 8;
// Query operands: one per slot of a span (kivi keys: each key group scales the query its own
// way), and one more for the window's keys.
constexpr int kQueries = kSpanSlots + 1;
constexpr int kWindowQuery = kSpanSlots;
constexpr int kMaxGroups = 4;  // per-token groups per head (D / G) this kernel takes
constexpr float kLog2e = 1.4426950408889634f;

// Where the workspace's arrays lie (kDecodeWorkspaceBytes in all, 64-byte aligned).
struct Workspace {
  uint16_t* keys;        // [kSpanSlots][D/32] tiles of 16 keys x 32 codes (bf16)
  uint32_t* query;       // [kQueries][D/32] tiles of 16 channel pairs x N columns (load_query, load_kivi_query)
  float* score_tiles;    // [kSpanSlots][16][N]
  float* key_scale;      // [G_k][kSpan]
  float* key_zero;
  float* params;         // [16][2 G]: one slot's (scale, zero) pairs
  float* scores;         // [rows][kSpan], scaled; -inf where a row does not read the key
  float* value_scale;    // [G_v][kSpan]
  float* value_zero;
  uint16_t* probs;       // [kSteps][G_v][16 rows][32] bf16 p * value scale: 32 keys, or hi|lo of 16
  uint32_t* values;      // [kSteps][D/16] tiles of 16 key pairs x 16 channels (VNNI words; split: 8 pairs twice)
  float* acc;            // [D/16] tiles of 16 rows x 16 channels
  float* query_sum;      // [kQueries][rows][G_k]: what multiplies a key's zero in its score
  float* channel_params; // [2D]: one kivi key group's (scale, zero) pairs
  float* zero_sum;       // [rows][G_v]: sum_t p * value zero
  float* row_max;        // [rows], scaled score units
  float* row_sum;        // [rows]
};

struct Carver {
  uint8_t* at;
  template <typename T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(at);
    at += (count * sizeof(T) + 63) / 64 * 64;
    return p;
  }
};

constexpr size_t rounded(size_t bytes) { return (bytes + 63) / 64 * 64; }
static_assert(rounded(2 * kSpanSlots * kMaxHeadSize * kSlot) +           // keys
                  rounded(4 * kQueries * kMaxHeadSize / 2 * 16) +          // query
                  rounded(4 * kSpanSlots * 256) +                         // score_tiles
                  4 * rounded(4 * kMaxGroups * kSpan) +                   // key and value scale, zero
                  rounded(4 * 32 * kMaxGroups) +                          // params
                  rounded(4 * kMaxDecodeRows * kSpan) +                   // scores
                  rounded(2 * kSteps * kMaxGroups * 512) +                // probs
                  rounded(4 * kSteps * kMaxHeadSize / 16 * 256) +         // values
                  rounded(4 * kMaxHeadSize / 16 * 256) +                  // acc
                  rounded(4 * kQueries * kMaxDecodeRows * kMaxGroups) +   // query_sum
                  rounded(8 * kMaxHeadSize) +                             // channel_params
                  rounded(4 * kMaxDecodeRows * kMaxGroups) + 2 * rounded(4 * kMaxDecodeRows) <=
                  kDecodeWorkspaceBytes,
              "lay_out's arrays fit the workspace attention.cpp allocates");

Workspace lay_out(uint8_t* base) {
  constexpr size_t d = kMaxHeadSize, rows = kMaxDecodeRows;
  Carver c{base};
  Workspace w;
  w.keys = c.take<uint16_t>(kSpanSlots * d * kSlot);
  w.query = c.take<uint32_t>(kQueries * d / 2 * 16);
  w.score_tiles = c.take<float>(kSpanSlots * 16 * 16);
  w.key_scale = c.take<float>(kMaxGroups * kSpan);
  w.key_zero = c.take<float>(kMaxGroups * kSpan);
  w.params = c.take<float>(16 * 2 * kMaxGroups);
  w.scores = c.take<float>(rows * kSpan);
  w.value_scale = c.take<float>(kMaxGroups * kSpan);
  w.value_zero = c.take<float>(kMaxGroups * kSpan);
  w.probs = c.take<uint16_t>(size_t(kSteps) * kMaxGroups * 16 * 32);
  w.values = c.take<uint32_t>(size_t(kSteps) * d / 16 * 256);
  w.acc = c.take<float>(d / 16 * 256);
  w.query_sum = c.take<float>(kQueries * rows * kMaxGroups);
  w.channel_params = c.take<float>(2 * d);
  w.zero_sum = c.take<float>(rows * kMaxGroups);
  w.row_max = c.take<float>(rows);
  w.row_sum = c.take<float>(rows);
  return w;
}

// ---------------------------------------------------------------------------------------
// Tiles (AMX through inline assembly, as in prefill_matmul.h)
// ---------------------------------------------------------------------------------------

// tmm0 scores (16 keys x N), tmm1/tmm2 query (16 pairs x N), tmm4/tmm6 keys (16 x 32 bf16) and
// then values (16 pairs x 16 words); tmm3 probs (rows x 32 bf16), tmm5/tmm7 accumulators (rows x 16).
TileConfig decode_tiles(int columns, int query_rows) {
  TileConfig config;
  for (int tile : {0, 1, 2}) config.set(tile, 16, 4 * columns);
  for (int tile : {3, 5, 7}) config.set(tile, query_rows, 64);
  return config;
}

// ---------------------------------------------------------------------------------------
// Codes -> bf16 words
// ---------------------------------------------------------------------------------------

// Value codes enter P'.V centred, as code - 2^(bits-1) (the zero moves by 2^(bits-1) scale):
// the probabilities are rounded to bf16 once, and centred codes keep that rounding's share
// (2^-9 relative per weight) proportional to a value's distance from its group's midpoint
// rather than to the value, as for prefill's rounding of p itself.
template <int kBits>
constexpr int kMidpoint = 1 << (kBits - 1);

// Keys enter the scores as bf16 words 0x4300 | code = 128 + code for 2 and 4 bits (exact, and
// no table lookup: two cheap logic ops per 32 channels), as code - 128 for 8 bits; their zeros
// move by -128 or +128 scale. The query's bf16 and the fp32 sums keep these exact but for fp32
// rounding of a sum ~ 128 |q| |scale| (4 bits above the codes' own share).
template <int kKeyBits>
constexpr float kKeyOffset = kKeyBits == 8 ? 128.0f : -128.0f;

// bf16 bits of a small integer (|v| < 256: exact).
constexpr uint16_t bf16_of(int v) {
  if (v == 0) return 0;
  const int magnitude = v < 0 ? -v : v;
  int exponent = 0;
  while ((magnitude >> (exponent + 1)) != 0) ++exponent;
  const int mantissa = (magnitude << (7 - exponent)) & 0x7f;
  return uint16_t((v < 0 ? 0x8000 : 0) | ((127 + exponent) << 7) | mantissa);
}

// vpermw reads the low 5 bits of each index word: a table of 32 entries that repeats every
// 2^kBits ignores the neighbouring codes above a code's own bits.
template <int kBits>
struct CodeTable {
  alignas(64) uint16_t words[32];
  constexpr CodeTable() : words() {
    for (int i = 0; i < 32; ++i) words[i] = bf16_of(i % (1 << kBits) - kMidpoint<kBits>);
  }
};

template <int kBits>
KVT_INLINE __m512i lookup_table() {
  static constexpr CodeTable<kBits == 8 ? 4 : kBits> kTable{};
  return _mm512_load_si512(kTable.words);
}

// Channels [c, c + 32) of a token row whose codes start at `row`: 32 bf16 words of the centred
// codes, in channel order (values; 8-bit keys too).
template <int kBits>
KVT_INLINE __m512i codes_to_bf16(const uint8_t* row, int c, __m512i table) {
  if constexpr (kBits == 8) {  // code ^ 0x80 read as signed = code - 128
    const __m256i bytes = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c)),
                                           _mm256_set1_epi8(char(0x80)));
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
    const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);
  } else if constexpr (kBits == 4) {  // byte i -> dword i: word 0 = the byte (low nibble), word 1 = its high nibble
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
    return _mm512_permutexvar_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), table);
  } else {  // byte i -> qword i: word k starts with bits 2k..2k+1 of the byte
    const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 4)));
    const __m512i spread = _mm512_or_si512(_mm512_or_si512(q, _mm512_slli_epi64(q, 14)),
                                           _mm512_or_si512(_mm512_slli_epi64(q, 28), _mm512_slli_epi64(q, 42)));
    return _mm512_permutexvar_epi16(spread, table);
  }
}

// ---------------------------------------------------------------------------------------
// Columns of small row-major matrices, as vectors over 16 keys
// ---------------------------------------------------------------------------------------

// out[j][t] = src[t * width + j] for t < 16, j < width (width <= 16): element t * width + j lies in
// source vector (t * width + j) / 16 at lane (t * width + j) % 16 (vpermps reads the low 4 bits).
// The indices and masks depend on the width only, so they are made once per item.
struct Columns {
  int width;
  __m512i index[16];
  __mmask16 from[16][16];  // [j][v]: lanes t of column j that source vector v holds

  explicit Columns(int w) : width(w) {
    const __m512i first = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(width));
    for (int j = 0; j < width; ++j) {
      index[j] = _mm512_add_epi32(first, _mm512_set1_epi32(j));
      for (int v = 0; v < width; ++v) {
        from[j][v] = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(index[j], 4), _mm512_set1_epi32(v));
      }
    }
  }

  KVT_INLINE void extract(const float* src, __m512* out) const {
    __m512 rows[16];
    for (int v = 0; v < width; ++v) rows[v] = _mm512_loadu_ps(src + 16 * v);
    for (int j = 0; j < width; ++j) {
      __m512 column = _mm512_setzero_ps();
      for (int v = 0; v < width; ++v) {
        if (from[j][v]) column = _mm512_mask_permutexvar_ps(column, from[j][v], index[j], rows[v]);
      }
      out[j] = column;
    }
  }
};

// The inverse, for operands: out[p * width + j] = lane p of source vector j (a column), for p < 16,
// j < width (width <= 16, even). Output vector k takes its lanes from the column pairs (2s, 2s + 1)
// by one vpermt2d each, merged by masks: a few shuffles instead of one scatter per column.
struct Interleave {
  int width;
  __m512i index[16][8];  // [k][s]: lane l of output vector k from pair s
  __mmask16 from[16][8];

  explicit Interleave(int w) : width(w) {
    for (int k = 0; k < width; ++k) {
      for (int pair = 0; pair < width / 2; ++pair) {
        alignas(64) int32_t lanes[16];
        __mmask16 mask = 0;
        for (int l = 0; l < 16; ++l) {
          const int at = 16 * k + l, p = at / width, j = at % width;
          lanes[l] = (j % 2) * 16 + p;
          if (j / 2 == pair) mask |= __mmask16(1u << l);
        }
        index[k][pair] = _mm512_load_si512(lanes);
        from[k][pair] = mask;
      }
    }
  }

  KVT_INLINE void store(const __m512i* columns, uint32_t* out) const {
    for (int k = 0; k < width; ++k) {
      __m512i v = _mm512_permutex2var_epi32(columns[0], index[k][0], columns[1]);
      for (int pair = 1; pair < width / 2; ++pair) {
        if (from[k][pair]) {
          v = _mm512_mask_blend_epi32(
              from[k][pair], v, _mm512_permutex2var_epi32(columns[2 * pair], index[k][pair], columns[2 * pair + 1]));
        }
      }
      _mm512_storeu_si512(out + 16 * k, v);
    }
  }
};

// ---------------------------------------------------------------------------------------
// The item
// ---------------------------------------------------------------------------------------

// x as two bf16 parts, hi = bf16(x) and lo = bf16(x - hi): together ~16 significant bits.
// Returns hi + lo, the value the matrix unit will see.
KVT_INLINE __m512 split_bf16(__m512 x, __m256i* hi, __m256i* lo) {
  *hi = (__m256i)_mm512_cvtneps_pbh(x);
  const __m512 hi_value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(*hi), 16));
  *lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, hi_value));
  return _mm512_add_ps(hi_value, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(*lo), 16)));
}

// 2^x for x <= 0; exactly 0 below -100 (and for -inf), so that no denormal ever reaches the
// products: each costs a microcode assist, and a softmax over long contexts has many weights that small.
KVT_INLINE __m512 exp2_nonpositive(__m512 x) {
  const __mmask16 representable = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-100.0f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(representable, exp2_fit(_mm512_max_ps(x, _mm512_set1_ps(-100.0f))));
}

struct DecodeItem {
  const ItemContext& c;
  const ItemScratch& s;
  Workspace w;
  int head_size, rows, key_groups, value_groups, columns;
  int key_group_size, value_group_size;  // channels
  int key_token_group;                   // kivi keys: positions per key group (0: per-token keys)
  const uint16_t* query_rows[kMaxDecodeRows];  // each row's query (bf16, channel order)
  const int16_t* key_order;              // channel of each key tile position (key_channel)
  Columns score_columns;                 // of the score tile: `columns` wide
  Columns param_columns;                 // of a slot's (scale, zero) pairs: 2 x groups wide
  Interleave kivi_columns;               // kivi keys: the query operand's hi and lo columns (per-token keys: width 0)
  __m512i full_key_index[kMaxHeadSize / 32];  // per key tile: its channels within their 64-channel chunk
};

// Key tile `tile`'s 32 words of a row of bf16 words in channel order: tile k takes channels of the
// 64-channel chunk k / 2 (one vpermt2w).
KVT_INLINE __m512i key_tile_words(const DecodeItem& it, const uint16_t* row, int tile) {
  const uint16_t* chunk = row + 64 * (tile / 2);
  const __m512i low = _mm512_loadu_si512(chunk);
  const __m512i high = 64 * (tile / 2) + 32 < it.head_size ? _mm512_loadu_si512(chunk + 32) : low;
  return _mm512_permutex2var_epi16(low, it.full_key_index[tile], high);
}

// Where a key channel sits in the key tiles: tile `tile`, position `pos` (fill_packed_keys'
// order; a permutation of the channels, so the query is laid out the same way).
KVT_INLINE int key_channel(int bits, int head_size, int tile, int pos) {
  if (bits == 8) return 32 * tile + pos;
  const int base = 64 * (tile / 2);
  if (base + 64 > head_size) {  // a last chunk of 32 channels in one tile (D = 96)
    return bits == 4 ? base + 2 * (pos % 16) + pos / 16 : base + 4 * (pos % 8) + pos / 8;
  }
  if (bits == 4) return base + 2 * pos + tile % 2;  // even channels, then odd ones
  return base + 4 * (pos % 16) + 2 * (tile % 2) + pos / 16;  // 2-bit fields 0 and 1, then 2 and 3
}

// key_channel of every key tile position, for one (bits, head size) at a time per thread.
const int16_t* key_order(int bits, int head_size) {
  thread_local struct {
    int bits = 0, head_size = 0;
    int16_t channel[kMaxHeadSize];
  } order;
  if (order.bits != bits || order.head_size != head_size) {
    for (int at = 0; at < head_size; ++at) order.channel[at] = int16_t(key_channel(bits, head_size, at / 32, at % 32));
    order.bits = bits;
    order.head_size = head_size;
  }
  return order.channel;
}

// Word `at` (a key tile position) of column `column` of query operand `query`.
KVT_INLINE uint16_t& query_word(const DecodeItem& it, int query, int at, int column) {
  uint16_t* words = reinterpret_cast<uint16_t*>(it.w.query + int64_t(query) * (it.head_size / 2) * it.columns);
  return words[2 * ((at / 2) * it.columns + column) + at % 2];
}

KVT_INLINE float* query_sums(const DecodeItem& it, int query) {
  return it.w.query_sum + query * kMaxDecodeRows * kMaxGroups;
}

// The query rows as right operands of the scores, in the key tiles' channel order.
// Per-token keys: one operand for every slot, row r's channels of group g in column
// r * key_groups + g (zeros elsewhere), and each (row, group)'s sum of the query.
// Kivi keys: the window's operand (row r in column 2r, zeros in 2r + 1).
void load_query(const DecodeItem& it) {
  const int d = it.head_size;
  const int query = it.key_token_group > 0 ? kWindowQuery : 0;
  std::memset(it.w.query + int64_t(query) * (d / 2) * it.columns, 0, size_t(d / 2) * it.columns * 4);
  for (int r = 0; r < it.rows; ++r) {
    const uint16_t* q = it.query_rows[r];
    float sum[kMaxGroups] = {};
    for (int at = 0; at < d; ++at) {
      const int channel = it.key_order[at];
      if (it.key_token_group > 0) {
        query_word(it, query, at, 2 * r) = q[channel];
        continue;
      }
      const int g = channel / it.key_group_size;  // a pair of positions lies in one group
      query_word(it, query, at, r * it.key_groups + g) = q[channel];
      sum[g] += bf16_to_float(q[channel]);
    }
    for (int g = 0; g < it.key_groups; ++g) query_sums(it, query)[r * kMaxGroups + g] = sum[g];
  }
}

// Kivi keys of key group `group` of a block plane: per channel c a scale s_c and zero z_c, so
//   score = sum_c (q_c s_c) code'_c + sum_c q_c (z_c + offset s_c),   code' = code - offset.
// Query operand `query` gets q * s as two bf16 parts (hi = bf16(x), lo = bf16(x - hi): ~16
// significant bits, as the keys' fp32 dequantization needs) in columns 2r and 2r + 1; the
// constant, computed with the same rounded parts, multiplies the slot's zero (1).
template <int kKeyBits>
void load_kivi_query(const DecodeItem& it, const uint8_t* plane, int group, int query) {
  const int d = it.head_size;
  const PlaneSide& side = it.c.key_side;
  float* params = it.w.channel_params;  // (scale, zero) per channel
  halves_to_float_array(plane + side.params_offset + int64_t(group) * kParamBytesPerGroup * d, 2 * d, params);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512 scale[kMaxHeadSize / 16], zero[kMaxHeadSize / 16];
  for (int c = 0; c < d; c += 16) {
    const __m512 pairs_low = _mm512_loadu_ps(params + 2 * c), pairs_high = _mm512_loadu_ps(params + 2 * c + 16);
    scale[c / 16] = _mm512_permutex2var_ps(pairs_low, even, pairs_high);
    zero[c / 16] = _mm512_permutex2var_ps(pairs_low, odd, pairs_high);
  }
  alignas(64) uint16_t parts[16][kMaxHeadSize];  // column 2r + part: row r's hi or lo part, channel order
  for (int r = 0; r < it.rows; ++r) {
    const uint16_t* q = it.query_rows[r];
    __m512 constant = _mm512_setzero_ps();
    for (int c = 0; c < d; c += 16) {
      const __m512 qv = bf16_to_floats(reinterpret_cast<const uint8_t*>(q + c));
      __m256i hi, lo;
      const __m512 x = split_bf16(_mm512_mul_ps(qv, scale[c / 16]), &hi, &lo);
      constant = _mm512_fmadd_ps(qv, zero[c / 16], constant);
      constant = _mm512_fmadd_ps(x, _mm512_set1_ps(kKeyOffset<kKeyBits>), constant);
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[2 * r] + c), hi);
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[2 * r + 1] + c), lo);
    }
    query_sums(it, query)[r * kMaxGroups] = _mm512_reduce_add_ps(constant);
    query_sums(it, query)[r * kMaxGroups + 1] = 0.0f;
  }
  uint32_t* operand = it.w.query + int64_t(query) * (d / 2) * it.columns;
  for (int tile = 0; tile < d / 32; ++tile) {  // into key tile order, then the operand's rows of channel pairs
    __m512i columns[16];
    for (int col = 0; col < it.columns; ++col) columns[col] = key_tile_words(it, parts[col], tile);
    it.kivi_columns.store(columns, operand + tile * 16 * it.columns);
  }
}

// (scale, zero) of `count` keys from `params` (count x 2 x groups fp16) as vectors over the
// slot, the zero moved to codes that enter the products as code - offset: zero + offset * scale.
KVT_INLINE void slot_params(const DecodeItem& it, const uint8_t* params, int count, float offset, __m512* scale,
                            __m512* zero) {
  const int groups = it.value_groups, width = 2 * groups;  // keys and values have the same groups
  float* staging = it.w.params;
  halves_to_float_array(params, count * width, staging);
  std::fill(staging + count * width, staging + 16 * width, 0.0f);
  __m512 columns[2 * kMaxGroups];
  it.param_columns.extract(staging, columns);
  for (int g = 0; g < groups; ++g) {
    scale[g] = columns[2 * g];
    zero[g] = _mm512_fmadd_ps(columns[2 * g], _mm512_set1_ps(offset), columns[2 * g + 1]);
  }
}

// ---------------------------------------------------------------------------------------
// One slot: up to 16 keys from one source, into the span
// ---------------------------------------------------------------------------------------
//
// A slot's keys are read from the packed pages (codes, scales, zeros) or from the window's
// rows in the model dtype (bf16 words as they are, scale 1, zero 0); either way the slot
// fills the left tiles of Q.K^T, the value pairs of P'.V and per key (scale, zero) vectors.


// The keys' codes of `count` keys of a block plane from `offset` on, as bf16 rows of `keys`, in
// key_channel's order.
template <int kKeyBits, int kHeadTiles>
KVT_INLINE void fill_packed_keys(const DecodeItem& it, const uint8_t* plane, int offset, int count, uint16_t* keys) {
  const PlaneSide& side = it.c.key_side;
  const uint8_t* codes = plane + side.codes_offset + int64_t(offset) * side.code_bytes;
  constexpr int kChunks = kHeadTiles / 2, kPartial = kHeadTiles % 2;  // 64-channel chunks, a last 32-channel one
  const __m512i high = _mm512_set1_epi16(0x4300);
  for (int t = 0; t < count; ++t, codes += side.code_bytes) {
    uint16_t* row = keys + t * 32;
    if constexpr (kKeyBits == 8) {
      const __m512i none = _mm512_setzero_si512();
      for (int tile = 0; tile < kHeadTiles; ++tile) _mm512_storeu_si512(row + tile * 512, codes_to_bf16<8>(codes, tile * 32, none));
    } else if constexpr (kKeyBits == 4) {
      for (int j = 0; j < kChunks; ++j) {
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * j)));
        _mm512_storeu_si512(row + 2 * j * 512, _mm512_ternarylogic_epi32(w, _mm512_set1_epi16(0x000f), high, 0xea));
        _mm512_storeu_si512(row + (2 * j + 1) * 512, _mm512_or_si512(_mm512_srli_epi16(w, 4), high));
      }
      if constexpr (kPartial) {
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * kChunks)));
        const __m256i h = _mm512_castsi512_si256(high);
        uint16_t* out = row + 2 * kChunks * 512;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_ternarylogic_epi32(w, _mm256_set1_epi16(0x000f), h, 0xea));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_or_si256(_mm256_srli_epi16(w, 4), h));
      }
    } else {
      const __m256i h = _mm512_castsi512_si256(high), mask = _mm256_set1_epi16(0x0003);
      for (int j = 0; j < kChunks; ++j) {
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * j)));
        uint16_t* out = row + 2 * j * 512;
        for (int field = 0; field < 4; ++field) {
          const __m256i words = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 2 * field), mask, h, 0xea);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (field / 2) * 512 + (field % 2) * 16), words);
        }
      }
      if constexpr (kPartial) {
        int64_t bytes;
        std::memcpy(&bytes, codes + 16 * kChunks, 8);
        const __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(bytes));
        uint16_t* out = row + 2 * kChunks * 512;
        for (int field = 0; field < 4; ++field) {
          const __m128i words = _mm_ternarylogic_epi32(_mm_srli_epi16(w, 2 * field), _mm256_castsi256_si128(mask),
                                                       _mm256_castsi256_si128(h), 0xea);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * field), words);
        }
      }
    }
  }
}

// Window keys at positions [first, first + count) as rows of `keys`, in key_channel's order.
template <int kHeadTiles>
KVT_INLINE void fill_full_keys(const DecodeItem& it, const FullRows& rows, int first, int count, uint16_t* keys) {
  for (int t = 0; t < count; ++t) {
    const uint16_t* row = static_cast<const uint16_t*>(rows.row(first + t));
    for (int tile = 0; tile < kHeadTiles; ++tile) _mm512_storeu_si512(keys + tile * 512 + t * 32, key_tile_words(it, row, tile));
  }
}

// Value rows as bf16 words (two keys of a pair, 32 channels a call) -> the pair rows of P'.V:
// rows 8 * (slot % 2) on of step slot / 2, or with split weights rows 0 and 8 on of step slot
// (the hi and the lo parts meet the same pairs); absent keys are zeros.
template <int kHeadTiles, bool kSplit, typename Words>
KVT_INLINE void fill_value_pairs(const DecodeItem& it, int count, int slot, Words words) {
  uint32_t* out = kSplit ? it.w.values + slot * (2 * kHeadTiles * 256)
                         : it.w.values + (slot / 2) * (2 * kHeadTiles * 256) + (slot % 2) * 8 * 16;
  for (int pair = 0; pair < 8; ++pair, out += 16) {
    const bool first = 2 * pair < count, second = 2 * pair + 1 < count;
    for (int tile = 0; tile < kHeadTiles; ++tile) {
      const __m512i a = first ? words(2 * pair, tile) : _mm512_setzero_si512();
      const __m512i b = second ? words(2 * pair + 1, tile) : _mm512_setzero_si512();
      const __m512i low = _mm512_unpacklo_epi16(a, b), high = _mm512_unpackhi_epi16(a, b);
      _mm512_storeu_si512(out + 2 * tile * 256, low);
      _mm512_storeu_si512(out + (2 * tile + 1) * 256, high);
      if constexpr (kSplit) {
        _mm512_storeu_si512(out + 2 * tile * 256 + 8 * 16, low);
        _mm512_storeu_si512(out + (2 * tile + 1) * 256 + 8 * 16, high);
      }
    }
  }
}

// (scale, zero) vectors of a slot into the span's arrays.
KVT_INLINE void store_params(const __m512* scale, const __m512* zero, int groups, int slot, float* scales,
                             float* zeros) {
  for (int g = 0; g < groups; ++g) {
    _mm512_storeu_ps(scales + g * kSpan + slot * kSlot, scale[g]);
    _mm512_storeu_ps(zeros + g * kSpan + slot * kSlot, zero[g]);
  }
}

// Which keys of a slot each row reads: positions in [begin[r], end[r]) (begin null: no lower bound).
struct Slot {
  int first, count;  // positions [first, first + count)
  const int* begin;
  const int* end;
  int query;         // the query operand its scores use
};

// `count` keys of a block plane from `offset` on into slot `slot` of the span.
template <int kKeyBits, int kValueBits, int kHeadTiles>
KVT_INLINE void fill_packed_slot(const DecodeItem& it, const uint8_t* plane, int offset, int count, int slot) {
  const PlaneSide& key = it.c.key_side;
  const PlaneSide& value = it.c.value_side;
  fill_packed_keys<kKeyBits, kHeadTiles>(it, plane, offset, count, it.w.keys + slot * kHeadTiles * 512);
  const __m512i table = lookup_table<kValueBits>();
  const uint8_t* codes = plane + value.codes_offset + int64_t(offset) * value.code_bytes;
  fill_value_pairs<kHeadTiles, kSplitWeights<kValueBits>>(it, count, slot, [&](int t, int tile) {
    return codes_to_bf16<kValueBits>(codes + t * value.code_bytes, tile * 32, table);
  });
  __m512 scale[kMaxGroups], zero[kMaxGroups];
  slot_params(it, plane + value.params_offset + int64_t(offset) * value.param_bytes, count, kMidpoint<kValueBits>,
              scale, zero);
  store_params(scale, zero, it.value_groups, slot, it.w.value_scale, it.w.value_zero);
  if (it.key_token_group > 0) {  // kivi: the scales are in the query, the zeros in its constant
    for (int g = 0; g < 2; ++g) scale[g] = zero[g] = _mm512_set1_ps(1.0f);
  } else {
    slot_params(it, plane + key.params_offset + int64_t(offset) * key.param_bytes, count, kKeyOffset<kKeyBits>,
                scale, zero);
  }
  store_params(scale, zero, it.key_groups, slot, it.w.key_scale, it.w.key_zero);
}

// Window positions [first, first + count) into slot `slot` of the span (scale 1, zero 0).
template <int kHeadTiles, bool kSplit>
KVT_INLINE void fill_full_slot(const DecodeItem& it, const WindowRows& rows, int first, int count, int slot) {
  fill_full_keys<kHeadTiles>(it, rows.keys, first, count, it.w.keys + slot * kHeadTiles * 512);
  fill_value_pairs<kHeadTiles, kSplit>(it, count, slot, [&](int t, int tile) {
    return _mm512_loadu_si512(static_cast<const uint8_t*>(rows.values.row(first + t)) + 64 * tile);
  });
  __m512 scale[kMaxGroups], zero[kMaxGroups];
  for (int g = 0; g < kMaxGroups; ++g) {
    scale[g] = _mm512_set1_ps(1.0f);
    zero[g] = _mm512_setzero_ps();
  }
  store_params(scale, zero, it.value_groups, slot, it.w.value_scale, it.w.value_zero);
  store_params(scale, zero, it.key_groups, slot, it.w.key_scale, it.w.key_zero);
}

// The query tiles stay loaded while the item runs where one operand serves every slot and
// fits two tiles (per-token keys, D = 64).
template <int kHeadTiles>
KVT_INLINE bool resident_query(const DecodeItem& it) {
  return kHeadTiles == 2 && it.key_token_group == 0;
}

// Q.K^T of every slot of the span on tmm0, each stored to its score tile. The slots' keys were
// all written before, so that no tile load waits for the vector stores that filled it.
// Consecutive reduction steps use different tiles (key tiles tmm4/tmm6, query tiles tmm1/tmm2),
// so that a load never waits for the product before it to release its tile.

template <int kHeadTiles>
KVT_INLINE void span_scores(const DecodeItem& it, const Slot* span, int slots) {
  const bool reload = !resident_query<kHeadTiles>(it);
  for (int slot = 0; slot < slots; ++slot) {
    const uint16_t* keys = it.w.keys + slot * kHeadTiles * 512;
    const uint32_t* operand = it.w.query + int64_t(span[slot].query) * (it.head_size / 2) * it.columns;
    KVT_TILE_ZERO(0);
    for (int tile = 0; tile < kHeadTiles; tile += 2) {
      const uint32_t* query = operand + tile * 16 * it.columns;
      KVT_TILE_LOAD(4, keys + tile * 512, 64);
      if (reload) KVT_TILE_LOAD(1, query, 4 * it.columns);
      KVT_TILE_DOT(0, 4, 1);
      if (tile + 1 < kHeadTiles) {
        KVT_TILE_LOAD(6, keys + (tile + 1) * 512, 64);
        if (reload) KVT_TILE_LOAD(2, query + 16 * it.columns, 4 * it.columns);
        KVT_TILE_DOT(0, 6, 2);
      }
    }
    KVT_TILE_STORE(0, it.w.score_tiles + slot * 256, 4 * it.columns);
  }
}

template <int kHeadTiles>
KVT_INLINE void load_resident_query(const DecodeItem& it) {
  if (resident_query<kHeadTiles>(it)) {
    KVT_TILE_LOAD(1, it.w.query, 4 * it.columns);
    KVT_TILE_LOAD(2, it.w.query + 16 * it.columns, 4 * it.columns);
  }
}

// A slot's scores from its score tile into the span: per row, the keys' scales and zeros
// applied, times the softmax scale, -inf where the row does not read the key.
KVT_INLINE void finish_scores(const DecodeItem& it, const Slot& slot, int index) {
  __m512 dots[16];
  it.score_columns.extract(it.w.score_tiles + index * 256, dots);
  __m512 scale[kMaxGroups], zero[kMaxGroups];
  for (int g = 0; g < it.key_groups; ++g) {
    scale[g] = _mm512_loadu_ps(it.w.key_scale + g * kSpan + index * kSlot);
    zero[g] = _mm512_loadu_ps(it.w.key_zero + g * kSpan + index * kSlot);
  }
  const __m512i position = _mm512_add_epi32(_mm512_set1_epi32(slot.first),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 present = __mmask16((1u << slot.count) - 1);
  for (int r = 0; r < it.rows; ++r) {
    __m512 score = _mm512_setzero_ps();
    for (int g = 0; g < it.key_groups; ++g) {
      score = _mm512_fmadd_ps(dots[r * it.key_groups + g], scale[g], score);
      score = _mm512_fmadd_ps(zero[g], _mm512_set1_ps(query_sums(it, slot.query)[r * kMaxGroups + g]), score);
    }
    __mmask16 read = present & _mm512_cmplt_epi32_mask(position, _mm512_set1_epi32(slot.end[r]));
    if (slot.begin) read &= _mm512_cmpge_epi32_mask(position, _mm512_set1_epi32(slot.begin[r]));
    _mm512_storeu_ps(it.w.scores + r * kSpan + index * kSlot,
                     _mm512_mask_mul_ps(_mm512_set1_ps(kNegInf), read, score, _mm512_set1_ps(it.c.p.scale)));
  }
}

// The accumulator tiles of row r times `factor`.
KVT_INLINE void rescale_row(const DecodeItem& it, int r, float factor) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int tile = 0; tile < it.head_size / 16; ++tile) {
    float* acc = it.w.acc + tile * 256 + r * 16;
    _mm512_storeu_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(acc), f));
  }
  it.w.row_sum[r] *= factor;
  for (int g = 0; g < it.value_groups; ++g) it.w.zero_sum[r * kMaxGroups + g] *= factor;
}

// The span's online-softmax update of every row, and the left tiles of P'.V: per step, value
// group and row, p * scale as bf16 for the step's 32 keys (two slots; zeros past the last slot),
// or with split weights its two parts for one slot's 16 keys.
template <bool kSplit>
void softmax_span(const DecodeItem& it, int slots) {
  const Workspace& w = it.w;
  for (int r = 0; r < it.rows; ++r) {
    const float* scores = w.scores + r * kSpan;
    __m512 max = _mm512_loadu_ps(scores);
    for (int k = 1; k < slots; ++k) max = _mm512_max_ps(max, _mm512_loadu_ps(scores + k * kSlot));
    const float span_max = _mm512_reduce_max_ps(max);
    const float old_max = w.row_max[r];
    if (span_max > old_max) {
      if (old_max != kNegInf) rescale_row(it, r, exp2_nonpositive(_mm512_set1_ps((old_max - span_max) * kLog2e))[0]);
      w.row_max[r] = span_max;
    }
    const __m512 bias = _mm512_set1_ps(w.row_max[r] == kNegInf ? 0.0f : w.row_max[r] * kLog2e);
    __m512 sum = _mm512_setzero_ps();
    __m512 zero_sum[kMaxGroups];
    for (int g = 0; g < it.value_groups; ++g) zero_sum[g] = _mm512_setzero_ps();
    for (int step = 0; 2 * step < slots; ++step) {
      __m512 p[2];
      for (int half = 0; half < 2; ++half) {
        const int k = 2 * step + half;
        if (k >= slots) {
          p[half] = _mm512_setzero_ps();
          continue;
        }
        // keys a row does not read (-inf) get exactly 0
        p[half] = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(scores + k * kSlot), _mm512_set1_ps(kLog2e), bias));
        sum = _mm512_add_ps(sum, p[half]);
      }
      for (int g = 0; g < it.value_groups; ++g) {
        __m512 weight[2];
        for (int half = 0; half < 2; ++half) {
          const int at = g * kSpan + (2 * step + half) * kSlot;  // past the last slot: p = 0, stale params
          weight[half] = _mm512_mul_ps(p[half], _mm512_loadu_ps(w.value_scale + at));
          zero_sum[g] = _mm512_fmadd_ps(p[half], _mm512_loadu_ps(w.value_zero + at), zero_sum[g]);
        }
        if constexpr (kSplit) {  // step k = slot k: [hi | lo] of its 16 weights
          for (int half = 0; half < 2 && 2 * step + half < slots; ++half) {
            __m256i hi, lo;
            split_bf16(weight[half], &hi, &lo);
            uint16_t* row = w.probs + ((int64_t(2 * step + half) * kMaxGroups + g) * 16 + r) * 32;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), hi);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 16), lo);
          }
        } else {
          _mm512_storeu_si512(w.probs + ((int64_t(step) * kMaxGroups + g) * 16 + r) * 32,
                              (__m512i)_mm512_cvtne2ps_pbh(weight[1], weight[0]));
        }
      }
    }
    w.row_sum[r] += _mm512_reduce_add_ps(sum);
    for (int g = 0; g < it.value_groups; ++g) w.zero_sum[r * kMaxGroups + g] += _mm512_reduce_add_ps(zero_sum[g]);
  }
}

// acc += P'.V for the span's steps (32 reduction steps each). Two accumulator tiles stay on the
// unit over the span's steps, so that the products chain on the unit instead of through memory.
template <bool kSplit>
void accumulate_span(const DecodeItem& it, int slots) {
  const int tiles = it.head_size / 16, steps = kSplit ? slots : (slots + 1) / 2;
  for (int tile = 0; tile < tiles; tile += 2) {
    const int group = tile * 16 / it.value_group_size;  // a pair of tiles lies in one 32-channel run
    float* acc = it.w.acc + tile * 256;
    KVT_TILE_LOAD(5, acc, 64);
    KVT_TILE_LOAD(7, acc + 256, 64);
    for (int step = 0; step < steps; ++step) {
      const uint32_t* values = it.w.values + (int64_t(step) * tiles + tile) * 256;
      KVT_TILE_LOAD(3, it.w.probs + (int64_t(step) * kMaxGroups + group) * 16 * 32, 64);
      KVT_TILE_LOAD(4, values, 64);
      KVT_TILE_LOAD(6, values + 256, 64);
      KVT_TILE_DOT(5, 3, 4);
      KVT_TILE_DOT(7, 3, 6);
    }
    KVT_TILE_STORE(5, acc, 64);
    KVT_TILE_STORE(7, acc + 256, 64);
  }
}

// Tile column n of accumulator tile 2a + h holds channel 32a + 8 (n / 4) + 4h + n % 4
// (unpacklo/unpackhi interleave 4 words per 128-bit lane); the zeros' share is added here.
void store_accumulators(const DecodeItem& it) {
  const ItemScratch& s = it.s;
  const int d = it.head_size;
  for (int r = 0; r < it.rows; ++r) {
    float* out = s.acc + int64_t(r) * d;
    for (int tile = 0; tile < d / 16; ++tile) {
      const float* acc = it.w.acc + tile * 256 + r * 16;
      for (int n = 0; n < 16; ++n) {
        const int channel = (tile / 2) * 32 + 8 * (n / 4) + 4 * (tile % 2) + n % 4;
        out[s.value_order[channel]] = acc[n] + it.w.zero_sum[r * kMaxGroups + channel / it.value_group_size];
      }
    }
    s.max[r] = it.w.row_max[r];
    s.sum[r] = it.w.row_sum[r];
  }
}

// Every key the item's rows read: the packed range [key_begin, max packed_end), then the window
// [min full_begin, max full_end), in spans of kSpanSlots slots: the span's slots filled, their
// scores computed and finished, one softmax update, then P'.V.
template <int kKeyBits, int kValueBits, int kHeadTiles>
void attend_amx(const DecodeItem& it) {
  const ItemContext& c = it.c;
  const AttentionParams& p = c.p;
  const int packed_end = max_of(it.s.packed_end, c.rows);
  const bool window = p.format.residual_length > 0;
  int full = window ? min_of(it.s.full_begin, c.rows) : 0;
  const int full_end = window ? max_of(it.s.full_end, c.rows) : 0;
  const WindowRows rows = window ? window_rows(c) : WindowRows{};
  const int32_t* blocks = p.block_table + int64_t(c.item.seq) * p.block_table_stride;
  auto plane_of = [&](int block) {
    return p.cache + int64_t(blocks[block]) * p.cache_stride_block + c.item.kv_head * p.cache_stride_head;
  };
  load_resident_query<kHeadTiles>(it);
  int packed = c.item.key_begin, block = packed / p.block_size, offset = packed % p.block_size;
  Slot span[kSpanSlots];
  while (packed < packed_end || full < full_end) {
    int slots = 0;
    for (; slots < kSpanSlots && packed < packed_end; ++slots) {
      int count = std::min({kSlot, p.block_size - offset, packed_end - packed});
      int query = 0;
      if (it.key_token_group > 0) {  // a slot inside one key group, whose operand is made once per span
        count = std::min(count, it.key_token_group - offset % it.key_token_group);
        const bool same_group = slots > 0 && offset % it.key_token_group != 0;
        query = same_group ? span[slots - 1].query : slots;
        if (!same_group) load_kivi_query<kKeyBits>(it, plane_of(block), offset / it.key_token_group, query);
      }
      const uint8_t* plane = plane_of(block);
      if ((block + 1) * p.block_size < packed_end) {  // the same keys of the next block (attend_packed's reasoning)
        const uint8_t* next = plane_of(block + 1);
        for (const PlaneSide* side : {&c.key_side, &c.value_side}) {
          prefetch_range(next + side->codes_offset + offset * side->code_bytes, count * side->code_bytes);
          prefetch_range(next + side->params_offset + offset * side->param_bytes, count * side->param_bytes);
        }
      }
      fill_packed_slot<kKeyBits, kValueBits, kHeadTiles>(it, plane, offset, count, slots);
      span[slots] = {packed, count, nullptr, it.s.packed_end, query};
      packed += count;
      offset += count;
      if (offset == p.block_size) {
        ++block;
        offset = 0;
      }
    }
    for (; slots < kSpanSlots && packed >= packed_end && full < full_end; ++slots) {
      const int count = std::min(kSlot, full_end - full);
      fill_full_slot<kHeadTiles, kSplitWeights<kValueBits>>(it, rows, full, count, slots);
      span[slots] = {full, count, it.s.full_begin, it.s.full_end, it.key_token_group > 0 ? kWindowQuery : 0};
      full += count;
    }
    span_scores<kHeadTiles>(it, span, slots);
    for (int slot = 0; slot < slots; ++slot) finish_scores(it, span[slot], slot);
    softmax_span<kSplitWeights<kValueBits>>(it, slots);
    accumulate_span<kSplitWeights<kValueBits>>(it, slots);
  }
}

template <int kKeyBits, int kValueBits>
void attend_amx_bits(const DecodeItem& it) {
  switch (it.head_size / 32) {
    case 2: attend_amx<kKeyBits, kValueBits, 2>(it); return;
    case 3: attend_amx<kKeyBits, kValueBits, 3>(it); return;
    case 4: attend_amx<kKeyBits, kValueBits, 4>(it); return;
    default: attend_amx<kKeyBits, kValueBits, 8>(it); return;
  }
}

template <int kKeyBits>
void attend_amx_keys(const DecodeItem& it) {
  switch (it.c.p.format.value_bits) {
    case 2: attend_amx_bits<kKeyBits, 2>(it); return;
    case 4: attend_amx_bits<kKeyBits, 4>(it); return;
    default: attend_amx_bits<kKeyBits, 8>(it); return;
  }
}

}  // namespace

bool decode_amx_takes(const AttentionParams& p, int rows) {
  const FormatArgs& f = p.format;
  const int d = p.head_size;
  if (p.dtype != ElemType::kBFloat16 || p.softcap > 0.0f || !(d == 64 || d == 96 || d == 128 || d == 256)) return false;
  if (f.key_bits == kUnquantizedBits || f.value_bits == kUnquantizedBits) return false;
  const int groups = p.head_size / f.group_size;
  const int key_groups = f.key_group_size > 0 ? 2 : groups;  // kivi: a hi and a lo column per row
  return groups <= kMaxGroups && rows <= kMaxDecodeRows && rows * key_groups <= 16;
}

void run_work_item_amx(const AttentionParams& p, const WorkItem& item, const ItemScratch& s, float* partial) {
  const ItemContext c = item_context(p, item);
  prepare_ranges(c, s);
  const int groups = p.head_size / p.format.group_size;
  const int key_groups = p.format.key_group_size > 0 ? 2 : groups;
  DecodeItem it{c,
                s,
                lay_out(s.matrix),
                p.head_size,
                c.rows,
                key_groups,
                groups,
                c.rows * key_groups,
                p.format.group_size,
                p.format.group_size,
                p.format.key_group_size,
                {},
                key_order(p.format.key_bits, p.head_size),
                Columns(c.rows * key_groups),
                Columns(2 * groups),
                Interleave(p.format.key_group_size > 0 ? c.rows * key_groups : 0),
                {}};
  for (int r = 0; r < c.rows; ++r) {
    it.query_rows[r] = static_cast<const uint16_t*>(p.query) + row_offset(c, r, p.query_stride_token, p.query_stride_head);
  }
  for (int tile = 0; tile < p.head_size / 32; ++tile) {
    alignas(64) uint16_t index[32];
    for (int pos = 0; pos < 32; ++pos) index[pos] = uint16_t(it.key_order[tile * 32 + pos] % 64);
    it.full_key_index[tile] = _mm512_load_si512(index);
  }
  std::memset(it.w.acc, 0, sizeof(float) * (p.head_size / 16) * 256);
  for (int r = 0; r < c.rows; ++r) {
    it.w.row_max[r] = kNegInf;
    it.w.row_sum[r] = 0.0f;
    for (int g = 0; g < kMaxGroups; ++g) it.w.zero_sum[r * kMaxGroups + g] = 0.0f;
  }
  load_query(it);
  amx_configure(decode_tiles(it.columns, c.rows));
  switch (p.format.key_bits) {
    case 2: attend_amx_keys<2>(it); break;
    case 4: attend_amx_keys<4>(it); break;
    default: attend_amx_keys<8>(it); break;
  }
  amx_release();
  store_accumulators(it);
  finish_rows(c, s, partial);
}

#else  // no AVX-512/AMX build (clang, non-x86): never chosen

bool decode_amx_takes(const AttentionParams&, int) { return false; }
void run_work_item_amx(const AttentionParams&, const WorkItem&, const ItemScratch&, float*) {}

#endif

}  // namespace kvtuner::cpu
