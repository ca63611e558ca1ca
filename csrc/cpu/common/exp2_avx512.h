// 2^x on 16 fp32 lanes for the AVX-512 kernels' softmax; included inside an AVX-512 target region
// (prefill_attention.cpp, amx/decode_attention.cpp). Internal linkage: each unit keeps its own copy.
#pragma once

#include <immintrin.h>

namespace kvtuner::cpu {
namespace {

// 2^round(x) by vscalefps times a degree-4 fit of 2^f on [-1/2, 1/2]: relative error < 3e-6, far
// below the bf16 rounding the probabilities then take. NaN for -inf (callers mask those lanes).
inline __m512 exp2_fit(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.570102207362652e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.591786280274391e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40247443318367e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931217908859253e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999992847442627e-1f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace
}  // namespace kvtuner::cpu
