// Encoding and decoding one block of a quantized state: the AVX-512 paths of cpu_avx512.h where they apply,
// the AVX2 table path (bucket-table gathers) for 8-bit table maps, and the scalar table path for the rest and
// every tail. All paths return the same codes (the scalar path is the definition; tests compare them with
// the PyTorch reference in quant/blockwise.py).
#pragma once

#include "cpu_avx2_closed.h"
#include "cpu_avx512.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Codes of one block given its scale; identical to encode_normalized() in the reference.
// Branch-free so it vectorizes (gathers from the small level and bucket tables).
template <bool STOCHASTIC>
void encode_values(const MapView& m, const float* __restrict x, int32_t* __restrict out, int64_t len,
                   float scale, uint32_t salt, uint32_t first_elem) {
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  const float* __restrict lev = m.levels;
  const int32_t last = m.num_levels - 1;
  const uint32_t sign_mask = m.is_signed ? 1u : 0u;
  const float first = m.lo, top = m.hi;
  for (int64_t i = 0; i < len; ++i) {
    float u = x[i] * inv;
    u = u < first ? first : u;
    u = u > top ? top : u;
    u = u + 0.0f;  // -0.0 -> +0.0
    if (!STOCHASTIC) {  // nearest: number of midpoints <= u (ties round up)
      int32_t cnt = m.mid_lut[bucket_key(u, m.mid_mant_bits, m.mid_exp_range, sign_mask)];
      out[i] = cnt + (m.mids[cnt] <= u ? 1 : 0);
      continue;
    }
    int32_t lo = m.lut[bucket_key(u, m.mant_bits, m.exp_range, sign_mask)];
    int32_t nxt = lo + 1 < last ? lo + 1 : last;
    lo = lev[nxt] <= u ? nxt : lo;
    int32_t hi = lo + 1 < last ? lo + 1 : last;
    float below = u - lev[lo];
    float gap = lev[hi] - lev[lo];
    float r = static_cast<float>(fmix32((first_elem + static_cast<uint32_t>(i)) * kGolden + salt) >> 8) *
              (1.0f / 16777216.0f);
    out[i] = r * gap < below ? hi : lo;
  }
}

#if defined(__AVX2__)
inline __m256i fmix32_avx2(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// Uniform draws in [0, 1) of elements first_elem .. first_elem + 7 (encode_values' counter hash and scaling).
inline __m256 draws_avx2(uint32_t first_elem, uint32_t salt) {
  const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first_elem)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i h = fmix32_avx2(_mm256_add_epi32(_mm256_mullo_epi32(idx, _mm256_set1_epi32(static_cast<int32_t>(kGolden))),
                                                 _mm256_set1_epi32(static_cast<int32_t>(salt))));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}

// Stochastic rounding between neighbouring codes lo and hi (levels lev_lo, lev_hi): hi with probability
// (u - lev_lo) / (lev_hi - lev_lo), from the draws (encode_values' comparison).
inline __m256i round_up_avx2(__m256 u, __m256 lev_lo, __m256 lev_hi, __m256i lo, __m256i hi, __m256 draw) {
  const __m256 up = _mm256_cmp_ps(_mm256_mul_ps(draw, _mm256_sub_ps(lev_hi, lev_lo)), _mm256_sub_ps(u, lev_lo), _CMP_LT_OQ);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), up));
}

struct KeyConsts {
  __m256i signmask, per_sign, ebias, erange, zero, byte, mant;
  __m128i mshift, eshift;
  KeyConsts(int mbits, int erange_, bool is_signed) {
    signmask = _mm256_set1_epi32(is_signed ? 1 : 0);
    per_sign = _mm256_set1_epi32((erange_ + 1) << mbits);
    ebias = _mm256_set1_epi32(127 - erange_);
    erange = _mm256_set1_epi32(erange_);
    zero = _mm256_setzero_si256();
    byte = _mm256_set1_epi32(0xFF);
    mant = _mm256_set1_epi32(0x7FFFFF);
    mshift = _mm_cvtsi32_si128(23 - mbits);
    eshift = _mm_cvtsi32_si128(mbits);
  }
};

inline __m256i bucket_key_avx2(__m256 u, const KeyConsts& k) {
  const __m256i b = _mm256_castps_si256(u);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(b, 31), k.signmask);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 23), k.byte), k.ebias);
  __m256i mant = _mm256_srl_epi32(_mm256_and_si256(b, k.mant), k.mshift);
  mant = _mm256_andnot_si256(_mm256_cmpgt_epi32(k.zero, e), mant);
  e = _mm256_min_epi32(_mm256_max_epi32(e, k.zero), k.erange);
  return _mm256_add_epi32(_mm256_mullo_epi32(sign, k.per_sign), _mm256_add_epi32(_mm256_sll_epi32(e, k.eshift), mant));
}

// Maps with at most 16 levels (4-bit): no tables at all. Nearest = number of midpoints <= u, counted with
// one compare per midpoint held in a register; stochastic = floor index counted the same way, its two
// neighbouring levels looked up with in-register permutes. Same results as the table path.
inline __m256 lookup16(__m256 lo8, __m256 hi8, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo8, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi8, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
}

template <bool STOCHASTIC>
int64_t encode_small_avx2(const MapView& m, const float* __restrict x, int32_t* __restrict out, int64_t len,
                          float scale, uint32_t salt, uint32_t first_elem) {
  const int n = m.num_levels;
  alignas(32) float lev[16], mid[16];
  for (int j = 0; j < 16; ++j) {
    lev[j] = m.levels[j < n ? j : n - 1];
    mid[j] = j < n - 1 ? m.mids[j] : std::numeric_limits<float>::infinity();
  }
  __m256 vmid[15], vlev[16];
  for (int j = 0; j < 15; ++j) vmid[j] = _mm256_set1_ps(mid[j]);
  for (int j = 0; j < 16; ++j) vlev[j] = _mm256_set1_ps(lev[j]);
  const __m256 lev_lo8 = _mm256_load_ps(lev), lev_hi8 = _mm256_load_ps(lev + 8);
  const __m256 vinv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
  const __m256 vfirst = _mm256_set1_ps(m.lo), vtop = _mm256_set1_ps(m.hi), vzero = _mm256_setzero_ps();
  const __m256i vlast = _mm256_set1_epi32(n - 1), vone = _mm256_set1_epi32(1);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    u = _mm256_blendv_ps(u, vfirst, _mm256_cmp_ps(u, vfirst, _CMP_LT_OQ));
    u = _mm256_blendv_ps(u, vtop, _mm256_cmp_ps(u, vtop, _CMP_GT_OQ));
    u = _mm256_add_ps(u, vzero);
    __m256i code = _mm256_setzero_si256();
    if (!STOCHASTIC) {
      for (int j = 0; j < 15; ++j)  // (mid <= u) is -1 per lane where true
        code = _mm256_sub_epi32(code, _mm256_castps_si256(_mm256_cmp_ps(vmid[j], u, _CMP_LE_OQ)));
    } else {
      __m256i cnt = _mm256_setzero_si256();
      for (int j = 0; j < 16; ++j)
        cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(vlev[j], u, _CMP_LE_OQ)));
      // padded levels repeat the last one: clamp the count to the real levels before taking the floor
      const __m256i lo = _mm256_sub_epi32(_mm256_min_epi32(cnt, _mm256_set1_epi32(n)), vone);
      const __m256i hi = _mm256_min_epi32(_mm256_add_epi32(lo, vone), vlast);
      code = round_up_avx2(u, lookup16(lev_lo8, lev_hi8, lo), lookup16(lev_lo8, lev_hi8, hi), lo, hi,
                           draws_avx2(first_elem + static_cast<uint32_t>(i), salt));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), code);
  }
  return i;
}

// encode_values() eight lanes at a time; returns how many elements it handled (a multiple of 8).
template <bool STOCHASTIC>
int64_t encode_values_avx2(const MapView& m, const float* __restrict x, int32_t* __restrict out, int64_t len,
                           float scale, uint32_t salt, uint32_t first_elem) {
  const __m256 vinv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
  const __m256 vfirst = _mm256_set1_ps(m.lo), vtop = _mm256_set1_ps(m.hi), vzero = _mm256_setzero_ps();
  const __m256i vlast = _mm256_set1_epi32(m.num_levels - 1), vone = _mm256_set1_epi32(1);
  const KeyConsts kfloor(m.mant_bits, m.exp_range, m.is_signed);
  const KeyConsts kmid(m.mid_mant_bits, m.mid_exp_range, m.is_signed);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    u = _mm256_blendv_ps(u, vfirst, _mm256_cmp_ps(u, vfirst, _CMP_LT_OQ));
    u = _mm256_blendv_ps(u, vtop, _mm256_cmp_ps(u, vtop, _CMP_GT_OQ));
    u = _mm256_add_ps(u, vzero);
    __m256i code;
    if (!STOCHASTIC) {  // nearest: number of midpoints <= u
      const __m256i cnt = _mm256_i32gather_epi32(m.mid_lut, bucket_key_avx2(u, kmid), 4);
      const __m256 mid = _mm256_i32gather_ps(m.mids, cnt, 4);
      // (mid <= u) is all-ones (-1) per lane: subtracting it adds one
      code = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(mid, u, _CMP_LE_OQ)));
    } else {
      __m256i lo = _mm256_i32gather_epi32(m.lut, bucket_key_avx2(u, kfloor), 4);
      const __m256i nxt = _mm256_min_epi32(_mm256_add_epi32(lo, vone), vlast);
      const __m256 lev_nxt = _mm256_i32gather_ps(m.levels, nxt, 4);
      lo = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(nxt),
                                                _mm256_cmp_ps(lev_nxt, u, _CMP_LE_OQ)));
      const __m256i hi = _mm256_min_epi32(_mm256_add_epi32(lo, vone), vlast);
      code = round_up_avx2(u, _mm256_i32gather_ps(m.levels, lo, 4), _mm256_i32gather_ps(m.levels, hi, 4), lo, hi,
                           draws_avx2(first_elem + static_cast<uint32_t>(i), salt));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), code);
  }
  return i;
}
#endif

#if defined(EFFOPT_HAVE_AVX512)
using FastState = State512;
#else
struct FastState {  // nothing to reuse without AVX-512
  explicit FastState(const StateView&) {}
};
#endif

template <int BITS>
void decode_block(const StateView& s, const FastState& fast, int64_t start, int64_t len, float scale,
                  float* __restrict out) {
  int64_t done = 0;
#if defined(EFFOPT_HAVE_AVX512)
  done = decode_block512<BITS>(s, fast, start, len, scale, out);
#else
  (void)fast;
#endif
  const float* __restrict lev = s.map.levels;
  if (BITS == 8) {
    const uint8_t* __restrict c = s.codes + start;
    for (int64_t i = done; i < len; ++i) out[i] = lev[c[i]] * scale;
  } else {  // start and done are even (block_size is even at 4 bits; done is a multiple of 16)
    const uint8_t* __restrict c = s.codes + ((start + done) >> 1);
    float* __restrict o = out + done;
    const int64_t rest = len - done, pairs = rest >> 1;
    for (int64_t j = 0; j < pairs; ++j) {
      o[2 * j] = lev[c[j] & 0xFu] * scale;
      o[2 * j + 1] = lev[c[j] >> 4] * scale;
    }
    if (rest & 1) o[rest - 1] = lev[c[pairs] & 0xFu] * scale;
  }
}

template <int BITS>
void encode_block(StateView& s, const FastState& fast, const float* __restrict buf, int32_t* __restrict tmp,
                  int64_t start, int64_t len, float scale) {
  int64_t direct = 0;  // codes the AVX-512 path wrote straight into s.codes
#if defined(EFFOPT_HAVE_AVX512)
  direct = s.stochastic ? encode_block512<BITS, true>(s, fast, buf, start, len, scale)
                        : encode_block512<BITS, false>(s, fast, buf, start, len, scale);
#else
  (void)fast;
#endif
  int64_t done = direct;
  const uint32_t first = static_cast<uint32_t>(start);
#if defined(__AVX2__)
  if (direct == 0) {
    const uint32_t salt = s.salt;
    auto draws = [salt](uint32_t first_elem) { return draws_avx2(first_elem, salt); };
    if (s.map.form == kSqrtUnsigned) {
      done = s.stochastic ? encode_closed_avx2<kSqrtUnsigned, true>(s.map, buf, tmp, len, scale, first, draws)
                          : encode_closed_avx2<kSqrtUnsigned, false>(s.map, buf, tmp, len, scale, first, draws);
    } else if (s.map.form == kSquareSigned) {
      done = s.stochastic ? encode_closed_avx2<kSquareSigned, true>(s.map, buf, tmp, len, scale, first, draws)
                          : encode_closed_avx2<kSquareSigned, false>(s.map, buf, tmp, len, scale, first, draws);
    } else if (s.map.num_levels <= 16) {
      done = s.stochastic ? encode_small_avx2<true>(s.map, buf, tmp, len, scale, s.salt, first)
                          : encode_small_avx2<false>(s.map, buf, tmp, len, scale, s.salt, first);
    } else {
      done = s.stochastic ? encode_values_avx2<true>(s.map, buf, tmp, len, scale, s.salt, first)
                          : encode_values_avx2<false>(s.map, buf, tmp, len, scale, s.salt, first);
    }
  }
#endif
  if (s.stochastic) {
    encode_values<true>(s.map, buf + done, tmp + done, len - done, scale, s.salt, first + static_cast<uint32_t>(done));
  } else {
    encode_values<false>(s.map, buf + done, tmp + done, len - done, scale, s.salt, first + static_cast<uint32_t>(done));
  }
  if (BITS == 8) {
    uint8_t* __restrict c = s.codes + start;
    for (int64_t i = direct; i < len; ++i) c[i] = static_cast<uint8_t>(tmp[i]);
  } else {  // direct is even; a tail of odd length pads its last high nibble with 0
    uint8_t* __restrict c = s.codes + ((start + direct) >> 1);
    const int32_t* __restrict t = tmp + direct;
    const int64_t rest = len - direct, pairs = rest >> 1;
    for (int64_t j = 0; j < pairs; ++j) c[j] = static_cast<uint8_t>(t[2 * j] | (t[2 * j + 1] << 4));
    if (rest & 1) c[pairs] = static_cast<uint8_t>(t[rest - 1]);
  }
}

// Largest |x| of a block, on the bit patterns (an integer max, which vectorizes without fast-math).
inline float block_absmax(const float* __restrict x, int64_t len) {
  uint32_t best = 0;
  for (int64_t i = 0; i < len; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7FFFFFFFu;
    best = b > best ? b : best;
  }
  return bits_to_float(best);
}

}  // namespace
