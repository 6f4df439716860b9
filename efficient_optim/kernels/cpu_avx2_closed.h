// AVX2 encoders of the closed-form maps (cpu_maps.h), 8 values at a time, for CPUs without AVX-512: the
// same method as cpu_avx512.h (an approximate root coordinate pushed up so the rounded index is exact or one
// too many, then one exact comparison), with AVX2's coarser rsqrt (relative error < 1.5 * 2^-12), hence a
// larger push (2^-10; the index is still at most one too many). Codes go to an int32 buffer, as the AVX2
// table encoders write them.
#pragma once

#include "cpu_maps.h"

#if defined(__AVX2__)
#include <immintrin.h>

namespace {

inline __m256 abs256(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

// cpu_maps.h's sqrt_level / square_level of the float index k (an exact small integer).
template <int FORM>
inline __m256 level256(const MapView& m, __m256 k) {
  if (FORM == kSqrtUnsigned) {
    const __m256 t = _mm256_mul_ps(_mm256_add_ps(k, _mm256_set1_ps(1.0f)), _mm256_set1_ps(m.coef));
    return _mm256_mul_ps(t, t);
  }
  const __m256 jf = _mm256_sub_ps(k, _mm256_set1_ps(static_cast<float>(m.half)));
  return _mm256_mul_ps(_mm256_mul_ps(jf, abs256(jf)), _mm256_set1_ps(m.coef));  // |level| <= 1: no clamp
}

inline __m256 root_magnitude256(__m256 a, float scale_r) {
  const __m256 safe = _mm256_max_ps(a, _mm256_set1_ps(1e-30f));
  return _mm256_mul_ps(_mm256_mul_ps(safe, _mm256_rsqrt_ps(safe)), _mm256_set1_ps(scale_r));
}

constexpr float kRootUp256 = 1.0f + 1.0f / 1024.0f, kRootDown256 = 1.0f - 1.0f / 1024.0f;

template <int FORM>
inline __m256 nearest_closed256(const MapView& m, __m256 u) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps();
  const __m256 a = abs256(u);
  const __m256 r = _mm256_round_ps(root_magnitude256(a, static_cast<float>(m.half) * kRootUp256),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (FORM == kSqrtUnsigned) {  // index c = r - 1; c1 = c + 1 in [1, n]
    const __m256 c1 = _mm256_min_ps(_mm256_max_ps(r, one), _mm256_set1_ps(static_cast<float>(m.half)));
    const __m256 inv = _mm256_set1_ps(m.coef);
    const __m256 t0 = _mm256_mul_ps(_mm256_sub_ps(c1, one), inv), t1 = _mm256_mul_ps(c1, inv);
    const __m256 mid = _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(t0, t0), _mm256_mul_ps(t1, t1)), half);
    const __m256 down = _mm256_and_ps(_mm256_cmp_ps(c1, one, _CMP_GT_OQ), _mm256_cmp_ps(u, mid, _CMP_LT_OQ));
    return _mm256_sub_ps(_mm256_sub_ps(c1, one), _mm256_and_ps(down, one));
  }
  const __m256 h = _mm256_set1_ps(static_cast<float>(m.half)), c = _mm256_set1_ps(m.coef);
  const __m256 j = _mm256_min_ps(r, h), jm = _mm256_sub_ps(j, one);
  const __m256 lj = _mm256_mul_ps(_mm256_mul_ps(j, j), c), ljm = _mm256_mul_ps(_mm256_mul_ps(jm, jm), c);
  const __m256 mid = _mm256_mul_ps(_mm256_add_ps(ljm, lj), half);
  const __m256 neg = _mm256_cmp_ps(u, zero, _CMP_LT_OQ);
  const __m256 below = _mm256_or_ps(_mm256_cmp_ps(a, mid, _CMP_LT_OQ),
                                    _mm256_and_ps(neg, _mm256_cmp_ps(a, mid, _CMP_EQ_OQ)));
  const __m256 jj = _mm256_sub_ps(j, _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(j, zero, _CMP_GT_OQ), below), one));
  return _mm256_blendv_ps(_mm256_add_ps(h, jj), _mm256_sub_ps(h, jj), neg);
}

template <int FORM>
inline __m256 stochastic_closed256(const MapView& m, __m256 u, __m256 draw) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 last = _mm256_set1_ps(static_cast<float>(m.num_levels - 1));
  const __m256 neg = _mm256_cmp_ps(u, zero, _CMP_LT_OQ);
  const __m256 a = abs256(u);
  const float hr = static_cast<float>(m.half);
  __m256 r = _mm256_blendv_ps(root_magnitude256(a, hr * kRootUp256), root_magnitude256(a, hr * kRootDown256), neg);
  r = _mm256_blendv_ps(r, _mm256_sub_ps(zero, r), neg);
  const __m256 offset = _mm256_set1_ps(FORM == kSqrtUnsigned ? -1.0f : hr);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_floor_ps(r), offset), zero), last);
  const __m256 l_below = level256<FORM>(m, _mm256_sub_ps(c, one)), l_c = level256<FORM>(m, c);
  const __m256 l_above = level256<FORM>(m, _mm256_min_ps(_mm256_add_ps(c, one), last));
  const __m256 down = _mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ), _mm256_cmp_ps(u, l_c, _CMP_LT_OQ));
  const __m256 lo = _mm256_sub_ps(c, _mm256_and_ps(down, one));
  const __m256 hi = _mm256_min_ps(_mm256_add_ps(lo, one), last);
  const __m256 l_lo = _mm256_blendv_ps(l_c, l_below, down);
  const __m256 l_hi = _mm256_blendv_ps(_mm256_blendv_ps(l_above, l_c, _mm256_cmp_ps(hi, c, _CMP_EQ_OQ)), l_c, down);
  const __m256 go_up = _mm256_cmp_ps(_mm256_mul_ps(draw, _mm256_sub_ps(l_hi, l_lo)), _mm256_sub_ps(u, l_lo), _CMP_LT_OQ);
  return _mm256_blendv_ps(lo, hi, go_up);
}

// Codes of x[0 .. len) (a multiple of 8 of it) of a closed-form map into out; returns how many it wrote.
// `draws(first element)` gives 8 uniform draws (the counter hash), used only for stochastic rounding.
template <int FORM, bool STOCHASTIC, typename Draws>
int64_t encode_closed_avx2(const MapView& m, const float* __restrict x, int32_t* __restrict out, int64_t len,
                           float scale, uint32_t first_elem, Draws draws) {
  const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
  const __m256 lo = _mm256_set1_ps(m.lo), hi = _mm256_set1_ps(m.hi);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 u = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), lo), hi);
    const __m256 code = STOCHASTIC ? stochastic_closed256<FORM>(m, u, draws(first_elem + static_cast<uint32_t>(i)))
                                   : nearest_closed256<FORM>(m, u);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_cvttps_epi32(code));
  }
  return i;
}

}  // namespace
#endif
