// AVX-512 encoders and decoders of one block, 16 values at a time, without table gathers where the map
// allows it (cpu_maps.h):
//   - closed-form maps (kSqrtUnsigned, kSquareSigned): the level index comes from an approximate square root
//     (rsqrt14, relative error < 2^-14), then one exact comparison against a level or midpoint the kernel
//     computes bit for bit as the table holds them, so the code is the table path's code;
//   - maps of at most 16 levels (every 4-bit map): levels and midpoints held in one register each, a 4-step
//     binary search with in-register permutes;
//   - 8-bit table maps (dynamic, ...): nearest rounding through the bucket tables with 16-lane gathers; decoding
//     and stochastic rounding left to the scalar decoder and the AVX2 table encoder (cpu_codec.h).
// Each function handles whole groups of 16 and returns how many values it handled; the caller finishes the tail
// with the scalar table path. Nearest = number of midpoints <= u (ties round up); stochastic = floor index,
// then up with probability (u - lo) / (hi - lo), the draw from the element's flat index (same hash).
#pragma once

#include "cpu_maps.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define EFFOPT_HAVE_AVX512 1
#include <immintrin.h>

namespace {

struct Consts512 {
  __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
  __m512 fzero = _mm512_setzero_ps(), half_f = _mm512_set1_ps(0.5f);
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
};

inline __m512i fmix32_512(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int32_t>(0x85EBCA6Bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int32_t>(0xC2B2AE35u)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// The hash input of elements first .. first + 15: index * golden + salt (the scalar path's counter hash); the
// next 16 elements' input is this plus 16 * golden (wrapping), so the encode loop adds instead of multiplying.
inline __m512i hash_input512(uint32_t first, uint32_t salt, const Consts512& k) {
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first)), k.lane);
  return _mm512_add_epi32(_mm512_mullo_epi32(idx, _mm512_set1_epi32(static_cast<int32_t>(kGolden))),
                          _mm512_set1_epi32(static_cast<int32_t>(salt)));
}

// Uniform draws in [0, 1) from hash inputs (the scalar path's mixing and scaling).
inline __m512 draws512(__m512i hash_in) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(fmix32_512(hash_in), 8)), _mm512_set1_ps(1.0f / 16777216.0f));
}

// The encoders below take u = x * inv unclamped: a value beyond the first or last level (by rounding, or below
// the first level of a zero-free map) gets the code the clamped value gets (the nearest search counts no
// midpoint / every midpoint; the floor index is clamped and its draw cannot move it past the end), so the
// scalar path's clamp is not repeated. A -0.0 is treated as +0.0 everywhere (comparisons, and u < 0 tests).

inline __m512i clamp512(__m512i v, __m512i lo, __m512i hi) { return _mm512_min_epi32(_mm512_max_epi32(v, lo), hi); }

// The level of index k, computed as cpu_maps.h's sqrt_level / square_level compute it.
template <int FORM>
inline __m512 level512(const MapView& m, __m512i k) {
  if (FORM == kSqrtUnsigned) {
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(k, _mm512_set1_epi32(1))), _mm512_set1_ps(m.coef));
    return _mm512_mul_ps(t, t);
  }
  const __m512 jf = _mm512_cvtepi32_ps(_mm512_sub_epi32(k, _mm512_set1_epi32(m.half)));
  return _mm512_mul_ps(_mm512_mul_ps(jf, _mm512_abs_ps(jf)), _mm512_set1_ps(m.coef));  // |level| <= 1: no clamp
}

// Levels are evenly spaced in the root coordinate r = n sqrt(u) (sqrt_nozero: level j at r = j + 1) or
// r = h sign(u) sqrt(|u|) (signed sqrt: level k at r = k - h). The kernel takes an approximate r (rsqrt14,
// relative error < 2^-14) pushed up by 2^-12 of its magnitude, so it is never below the exact r and above it
// by < 0.1. Then, with levels at integer r:
//   - floor index: floor(r_up) is the exact floor or one more (one comparison with a level corrects it);
//   - nearest: each value-domain midpoint lies above the r-domain midpoint (j + 1/2) by at most 0.21 in r
//     (its square root is the quadratic mean of two neighbouring r), so rounding the magnitude of r_up to
//     the nearest integer gives the exact nearest index or one more (one comparison with a midpoint).
// The magnitude of r for |u| = a, times scale_r (h or n, with the push up or down folded in).
inline __m512 root_magnitude512(__m512 a, float scale_r) {
  const __m512 safe = _mm512_max_ps(a, _mm512_set1_ps(1e-30f));  // no rsqrt of 0 or a denormal
  return _mm512_mul_ps(_mm512_mul_ps(safe, _mm512_rsqrt14_ps(safe)), _mm512_set1_ps(scale_r));
}

constexpr float kRootUp = 1.0f + 1.0f / 4096.0f, kRootDown = 1.0f - 1.0f / 4096.0f;

// Nearest codes of 16 values of a closed-form map.
template <int FORM>
inline __m512i nearest_closed512(const MapView& m, __m512 u, const Consts512& k) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (FORM == kSqrtUnsigned) {  // u >= 0 (v); index = r - 1, in floats (exact small integers)
    const __m512 r = _mm512_roundscale_ps(root_magnitude512(u, static_cast<float>(m.half) * kRootUp),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 c1 = _mm512_min_ps(_mm512_max_ps(r, one), _mm512_set1_ps(static_cast<float>(m.half)));  // c + 1
    const __m512 inv = _mm512_set1_ps(m.coef);
    const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(c1, one), inv), t1 = _mm512_mul_ps(c1, inv);  // roots of c - 1, c
    const __m512 mid = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(t0, t0), _mm512_mul_ps(t1, t1)), k.half_f);
    const __mmask16 down = _mm512_cmp_ps_mask(c1, one, _CMP_GT_OQ) & _mm512_cmp_ps_mask(u, mid, _CMP_LT_OQ);
    return _mm512_cvttps_epi32(_mm512_mask_sub_ps(_mm512_sub_ps(c1, one), down, _mm512_sub_ps(c1, one), one));
  }
  // signed: magnitude index j in 0..h, its midpoint with j - 1 from the non-negative levels; a tie rounds up,
  // i.e. away from zero for u > 0 and toward zero for u < 0 (the mirrored midpoint is <= u)
  const __m512 a = _mm512_abs_ps(u);
  const __m512 r = _mm512_roundscale_ps(root_magnitude512(a, static_cast<float>(m.half) * kRootUp),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 j = _mm512_min_ps(r, _mm512_set1_ps(static_cast<float>(m.half)));
  const __m512 jm = _mm512_sub_ps(j, one), c = _mm512_set1_ps(m.coef);
  // square_level of magnitudes j - 1 and j (non-negative, <= 1 up to the clamp at h)
  const __m512 lj = _mm512_mul_ps(_mm512_mul_ps(j, j), c), ljm = _mm512_mul_ps(_mm512_mul_ps(jm, jm), c);
  const __m512 mid = _mm512_mul_ps(_mm512_add_ps(ljm, lj), k.half_f);
  const __mmask16 neg = _mm512_cmp_ps_mask(u, k.fzero, _CMP_LT_OQ);
  const __mmask16 below = _mm512_cmp_ps_mask(a, mid, _CMP_LT_OQ) | (neg & _mm512_cmp_ps_mask(a, mid, _CMP_EQ_OQ));
  const __m512i jj = _mm512_cvttps_epi32(_mm512_mask_sub_ps(j, _mm512_cmp_ps_mask(j, k.fzero, _CMP_GT_OQ) & below, j, one));
  const __m512i h = _mm512_set1_epi32(m.half);
  return _mm512_mask_sub_epi32(_mm512_add_epi32(h, jj), neg, h, jj);
}

// Stochastic rounding between neighbouring codes lo and hi (levels l_lo, l_hi): hi with probability
// (u - l_lo) / (l_hi - l_lo), from the element's draw (the scalar path's comparison).
inline __m512i round_up512(__m512 u, __m512 l_lo, __m512 l_hi, __m512i lo, __m512i hi, __m512i hash_in) {
  const __mmask16 go_up = _mm512_cmp_ps_mask(_mm512_mul_ps(draws512(hash_in), _mm512_sub_ps(l_hi, l_lo)),
                                             _mm512_sub_ps(u, l_lo), _CMP_LT_OQ);
  return _mm512_mask_blend_epi32(go_up, lo, hi);
}

// Stochastic codes of 16 values of a closed-form map: floor index, then up with probability (u - lo) / (hi - lo).
template <int FORM>
inline __m512i stochastic_closed512(const MapView& m, __m512 u, __m512i hash_in, const Consts512& k) {
  const __m512i last = _mm512_set1_epi32(m.num_levels - 1);
  const __mmask16 neg = _mm512_cmp_ps_mask(u, k.fzero, _CMP_LT_OQ);
  const __m512 a = _mm512_abs_ps(u);
  const float hr = static_cast<float>(m.half);
  // r pushed up in signed terms: magnitude up for u >= 0, down for u < 0
  __m512 r = _mm512_mask_blend_ps(neg, root_magnitude512(a, hr * kRootUp), root_magnitude512(a, hr * kRootDown));
  r = _mm512_mask_sub_ps(r, neg, k.fzero, r);
  const __m512i fl = _mm512_cvttps_epi32(_mm512_roundscale_ps(r, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
  const __m512i c = clamp512(_mm512_add_epi32(fl, _mm512_set1_epi32(FORM == kSqrtUnsigned ? -1 : m.half)), k.zero, last);
  const __m512 l_below = level512<FORM>(m, _mm512_sub_epi32(c, k.one)), l_c = level512<FORM>(m, c);
  const __m512 l_above = level512<FORM>(m, _mm512_min_epi32(_mm512_add_epi32(c, k.one), last));
  const __mmask16 down = _mm512_cmpgt_epi32_mask(c, k.zero) & _mm512_cmp_ps_mask(u, l_c, _CMP_LT_OQ);
  const __m512i lo = _mm512_mask_sub_epi32(c, down, c, k.one);
  const __m512i hi = _mm512_min_epi32(_mm512_add_epi32(lo, k.one), last);
  const __m512 l_lo = _mm512_mask_blend_ps(down, l_c, l_below);
  const __m512 l_hi = _mm512_mask_blend_ps(down, _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(hi, c), l_above, l_c), l_c);
  return round_up512(u, l_lo, l_hi, lo, hi, hash_in);
}

template <int FORM, bool STOCHASTIC>
inline __m512i encode_closed512(const MapView& m, __m512 u, __m512i hash_in, const Consts512& k) {
  if (STOCHASTIC) return stochastic_closed512<FORM>(m, u, hash_in, k);
  return nearest_closed512<FORM>(m, u, k);
}

// A map of at most 16 levels in registers: its levels (padded with the last), and the search arrays of the
// two roundings (midpoints for nearest, levels for the floor index), padded with +inf (a decode-only view
// has no midpoints).
struct Small512 {
  __m512 levels, search;
  explicit Small512(const MapView& m, bool stochastic) {
    alignas(64) float lev[16], key[16];
    const int n = m.num_levels;
    const float inf = std::numeric_limits<float>::infinity();
    for (int j = 0; j < 16; ++j) {
      lev[j] = m.levels[j < n ? j : n - 1];
      key[j] = j < n ? (stochastic ? m.levels[j] : (j < n - 1 && m.mids ? m.mids[j] : inf)) : inf;
    }
    levels = _mm512_load_ps(lev);
    search = _mm512_load_ps(key);
  }
};

// Number of entries of the sorted 16-entry register `search` that are <= u (binary search, 4 permutes).
inline __m512i count_le512(__m512 search, __m512 u) {
  __m512i idx = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
    const __mmask16 le = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(probe, search), u, _CMP_LE_OQ);
    idx = _mm512_mask_add_epi32(idx, le, idx, _mm512_set1_epi32(step));
  }
  return idx;
}

template <bool STOCHASTIC>
inline __m512i encode_small512(const MapView& m, const Small512& t, __m512 u, __m512i hash_in,
                               const Consts512& k) {
  const __m512i cnt = count_le512(t.search, u);
  if (!STOCHASTIC) return cnt;
  const __m512i last = _mm512_set1_epi32(m.num_levels - 1);
  const __m512i lo = _mm512_max_epi32(_mm512_sub_epi32(cnt, k.one), k.zero);
  const __m512i hi = _mm512_min_epi32(_mm512_add_epi32(lo, k.one), last);
  return round_up512(u, _mm512_permutexvar_ps(lo, t.levels), _mm512_permutexvar_ps(hi, t.levels), lo, hi, hash_in);
}

// Nearest codes of 16 values of an 8-bit table map (dynamic, ...): the midpoint bucket table's count, then one
// comparison with the midpoint it points at (cpu_codec.h's encode_values, 16 lanes; two gathers).
inline __m512i nearest_table512(const MapView& m, __m512 u) {
  u = _mm512_add_ps(_mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(m.lo)), _mm512_set1_ps(m.hi)), _mm512_setzero_ps());
  const __m512i b = _mm512_castps_si512(u);
  __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(0xFF)),
                               _mm512_set1_epi32(127 - m.mid_exp_range));
  __m512i mant = _mm512_srli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFF)), 23 - m.mid_mant_bits);
  mant = _mm512_maskz_mov_epi32(_mm512_cmpge_epi32_mask(e, _mm512_setzero_si512()), mant);
  e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_setzero_si512()), _mm512_set1_epi32(m.mid_exp_range));
  __m512i key = _mm512_add_epi32(_mm512_sllv_epi32(e, _mm512_set1_epi32(m.mid_mant_bits)), mant);
  if (m.is_signed) {
    const __mmask16 neg = _mm512_test_epi32_mask(b, _mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
    key = _mm512_mask_add_epi32(key, neg, key, _mm512_set1_epi32((m.mid_exp_range + 1) << m.mid_mant_bits));
  }
  const __m512i cnt = _mm512_i32gather_epi32(key, m.mid_lut, 4);
  const __m512 mid = _mm512_i32gather_ps(cnt, m.mids, 4);
  return _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(mid, u, _CMP_LE_OQ), cnt, _mm512_set1_epi32(1));
}

// Store 16 codes: 16 bytes (8-bit) or 8 bytes of two nibbles each, the even element in the low nibble (4-bit).
template <int BITS>
inline void store_codes512(uint8_t* dst, __m512i codes) {
  if (BITS == 8) {
#if defined(__AVX512VBMI__)  // byte 0 of each 32-bit lane with one byte permute (cheaper than vpmovdb on AMD)
    const __m512i pick = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0x3C3834302C282420LL, 0x1C1814100C080400LL);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(_mm512_permutexvar_epi8(pick, codes)));
#else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(codes));
#endif
  } else {
    const __m512i pairs = _mm512_or_si512(codes, _mm512_srli_epi64(codes, 28));  // even | odd << 4, per 64 bits
#if defined(__AVX512VBMI__)  // byte 0 of each 64-bit lane with one byte permute (cheaper than vpmovqb on AMD)
    const __m512i pick = _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, 0x3830282018100800LL);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(_mm512_permutexvar_epi8(pick, pairs)));
#else
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi64_epi8(_mm512_and_si512(pairs, _mm512_set1_epi64(0xFF))));
#endif
  }
}

// What the block functions of one state reuse: constants and the map's registers (built once per thread).
struct State512 {
  Consts512 k;
  Small512 table;
  explicit State512(const StateView& s) : table(s.map, s.stochastic) {}
};

// Encode 16 values at a time with `encode16(u, hash inputs)`: codes stored straight into the state.
template <int BITS, typename Encode16>
inline int64_t encode_loop512(StateView& s, const Consts512& k, const float* __restrict x, int64_t start, int64_t len,
                              float scale, Encode16 encode16) {
  const __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
  const __m512i hash_step = _mm512_set1_epi32(static_cast<int32_t>(16u * kGolden));
  __m512i hash_in = hash_input512(static_cast<uint32_t>(start), s.salt, k);
  uint8_t* codes = s.codes + (BITS == 8 ? start : start >> 1);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16, hash_in = _mm512_add_epi32(hash_in, hash_step))
    store_codes512<BITS>(codes + (BITS == 8 ? i : i >> 1), encode16(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv), hash_in));
  return i;
}

// Encode x[0 .. len) of the block starting at element `start` straight into the codes; returns how many
// values it encoded (a multiple of 16), 0 for an 8-bit table map (the AVX2 table path takes those).
template <int BITS, bool STOCHASTIC>
int64_t encode_block512(StateView& s, const State512& st, const float* __restrict x, int64_t start, int64_t len,
                        float scale) {
  const MapView& m = s.map;
  const Consts512& k = st.k;
  if (m.num_levels <= 16)
    return encode_loop512<BITS>(s, k, x, start, len, scale, [&](__m512 u, __m512i hash_in) {
      return encode_small512<STOCHASTIC>(m, st.table, u, hash_in, k);
    });
  if (m.form == kSqrtUnsigned)
    return encode_loop512<BITS>(s, k, x, start, len, scale, [&](__m512 u, __m512i hash_in) {
      return encode_closed512<kSqrtUnsigned, STOCHASTIC>(m, u, hash_in, k);
    });
  if (m.form == kSquareSigned)
    return encode_loop512<BITS>(s, k, x, start, len, scale, [&](__m512 u, __m512i hash_in) {
      return encode_closed512<kSquareSigned, STOCHASTIC>(m, u, hash_in, k);
    });
  if (!STOCHASTIC)
    return encode_loop512<BITS>(s, k, x, start, len, scale, [&](__m512 u, __m512i) { return nearest_table512(m, u); });
  return 0;
}

// ------------------------------------------------------------------ the AdamW block: decode, update, maxima
// Decoders of 16 values at block offset i (codes of the block, levels times the block scale).
struct Decode4x16 {
  const uint8_t* codes;
  __m512 table, scale;
  __m512 operator()(int64_t i) const {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + (i >> 1)));
    const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib), table), scale);
  }
};

template <int FORM>
struct DecodeClosed8x16 {
  const uint8_t* codes;
  const MapView* map;
  __m512 scale;
  __m512 operator()(int64_t i) const {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    return _mm512_mul_ps(level512<FORM>(*map, idx), scale);
  }
};

// Whether a state's block can be decoded 16 at a time (4-bit maps, and the 8-bit closed-form maps).
template <int BITS>
inline bool decodes512(const StateView& s) { return BITS == 4 || s.map.form != kTable; }

// Calls f with the decoder of the block starting at `start` (decodes512 must hold).
template <int BITS, typename F>
inline void with_decoder512(const StateView& s, const State512& st, int64_t start, float scale, F f) {
  const __m512 vs = _mm512_set1_ps(scale);
  if (BITS == 4) f(Decode4x16{s.codes + (start >> 1), st.table.levels, vs});
  else if (s.map.form == kSqrtUnsigned) f(DecodeClosed8x16<kSqrtUnsigned>{s.codes + start, &s.map, vs});
  else f(DecodeClosed8x16<kSquareSigned>{s.codes + start, &s.map, vs});
}

// Decode 16 values at a time of the block starting at element `start`; returns how many it decoded (0 for an
// 8-bit table map: for a 256-entry table, scalar loads beat a gather on this core).
template <int BITS>
int64_t decode_block512(const StateView& s, const State512& st, int64_t start, int64_t len, float scale,
                        float* __restrict out) {
  if (!decodes512<BITS>(s)) return 0;
  const int64_t whole = len & ~int64_t{15};
  with_decoder512<BITS>(s, st, start, scale, [&](auto decode) {
    for (int64_t i = 0; i < whole; i += 16) _mm512_storeu_ps(out + i, decode(i));
  });
  return whole;
}

// AdamW on 16 values with adamw_update's operations in its order: the new m and v, and p updated in place.
struct Adam512 {
  __m512 b2, eps, decay, step, inv_bc2, omb1, omb2;
  explicit Adam512(const AdamScalars& a)
      : b2(_mm512_set1_ps(a.beta2)), eps(_mm512_set1_ps(a.eps)), decay(_mm512_set1_ps(a.decay)),
        step(_mm512_set1_ps(a.step_size)), inv_bc2(_mm512_set1_ps(a.inv_sqrt_bc2)),
        omb1(_mm512_set1_ps(a.one_minus_b1)), omb2(_mm512_set1_ps(a.one_minus_b2)) {}
  void operator()(float* p, __m512 g, __m512 m0, __m512 v0, __m512& mi, __m512& vi) const {
    mi = _mm512_add_ps(m0, _mm512_mul_ps(omb1, _mm512_sub_ps(g, m0)));
    vi = _mm512_add_ps(_mm512_mul_ps(v0, b2), _mm512_mul_ps(omb2, _mm512_mul_ps(g, g)));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), inv_bc2), eps);
    _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p), decay), _mm512_mul_ps(step, _mm512_div_ps(mi, denom))));
  }
};

// Largest |x| bit pattern seen so far (an integer max on the bits, as block_absmax takes it).
inline __m512i absmax_bits512(__m512i best, __m512 x) {
  return _mm512_max_epu32(best, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
}

// One pass over the first multiple of 16 of a block: decode m and v, the AdamW update of p (the arithmetic of
// adamw_update, operation for operation), the new m and v into mbuf / vbuf, and their largest magnitudes (bit
// patterns, maxed into *mmax / *vmax). Returns how many elements it did (0 if a state cannot be decoded here).
template <int MB, int VB>
int64_t adamw_block512(float* __restrict p, const float* __restrict g, const StateView& m, const State512& mf,
                       const StateView& v, const State512& vf, int64_t start, int64_t len, float m_scale,
                       float v_scale, const AdamScalars& a, float* __restrict mbuf, float* __restrict vbuf,
                       uint32_t* mmax, uint32_t* vmax) {
  if (!decodes512<MB>(m) || !decodes512<VB>(v)) return 0;
  const int64_t whole = len & ~int64_t{15};
  with_decoder512<MB>(m, mf, start, m_scale, [&](auto decode_m) {
    with_decoder512<VB>(v, vf, start, v_scale, [&](auto decode_v) {
      const Adam512 adam(a);
      __m512i mbest = _mm512_setzero_si512(), vbest = _mm512_setzero_si512();
      for (int64_t i = 0; i < whole; i += 16) {
        __m512 mi, vi;
        adam(p + i, _mm512_loadu_ps(g + i), decode_m(i), decode_v(i), mi, vi);
        _mm512_storeu_ps(mbuf + i, mi);
        _mm512_storeu_ps(vbuf + i, vi);
        mbest = absmax_bits512(mbest, mi);
        vbest = absmax_bits512(vbest, vi);
      }
      const uint32_t mb = _mm512_reduce_max_epu32(mbest), vb = _mm512_reduce_max_epu32(vbest);
      *mmax = mb > *mmax ? mb : *mmax;
      *vmax = vb > *vmax ? vb : *vmax;
    });
  });
  return whole;
}

// adamw_update() on arrays, 16 at a time (same operations); returns how many elements it did.
inline int64_t adamw_update512(float* __restrict p, const float* __restrict g, float* __restrict m,
                               float* __restrict v, int64_t len, const AdamScalars& a) {
  const Adam512 adam(a);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 mi, vi;
    adam(p + i, _mm512_loadu_ps(g + i), _mm512_loadu_ps(m + i), _mm512_loadu_ps(v + i), mi, vi);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
  }
  return i;
}

}  // namespace
#endif
