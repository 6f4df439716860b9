// Fused block-wise quantized AdamW step for the CPU.
//
// One pass per block of `block_size` elements: decode m and v (level table x block scale), apply the
// AdamW update to the fp32 parameter, find the new block maxima, round the scales, re-encode both
// moments through the map's bucket table. No temporaries outside a per-thread block buffer; the inner
// loops are branch-free so the compiler vectorizes them (AVX2 gathers for the table reads).
//
// The arithmetic mirrors efficient_optim/quant/blockwise.py (the reference) step by step: same scale
// rounding, same bucket-table floor index, same counter-based hash for stochastic rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr uint32_t kGolden = 0x9E3779B9u;

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

struct MapView {
  const float* levels;
  const int32_t* lut;  // bucket table (see quant/maps.py): floor index at each bucket's lower edge
  int num_levels;
  int mant_bits;
  int exp_range;
  bool is_signed;
  // nearest rounding: bucket table over the fp32 midpoints (+inf padded): count of midpoints <= edge
  const float* mids;
  const int32_t* mid_lut;
  int mid_mant_bits;
  int mid_exp_range;
  float lo, hi;  // first and last level
};

struct StateView {
  uint8_t* codes;
  void* scales;
  bool scale_bf16;
  MapView map;
  bool stochastic;
  uint32_t salt;
};

inline float load_scale(const StateView& s, int64_t b) {
  if (s.scale_bf16) {
    uint16_t raw = static_cast<const uint16_t*>(s.scales)[b];
    return bits_to_float(static_cast<uint32_t>(raw) << 16);
  }
  return static_cast<const float*>(s.scales)[b];
}

// Store the block maximum as the scale (bf16: rounded up, clamped to the largest finite bf16);
// returns the scale value actually used for encoding.
inline float store_scale(StateView& s, int64_t b, float absmax) {
  if (s.scale_bf16) {
    uint64_t bits = float_to_bits(absmax);
    bits = (bits + 0xFFFFu) & 0xFFFF0000u;
    if (bits > 0x7F7F0000u) bits = 0x7F7F0000u;
    static_cast<uint16_t*>(s.scales)[b] = static_cast<uint16_t>(bits >> 16);
    return bits_to_float(static_cast<uint32_t>(bits));
  }
  static_cast<float*>(s.scales)[b] = absmax;
  return absmax;
}

inline uint32_t bucket_key(float u, int mbits, int erange, uint32_t sign_mask) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  uint32_t sign = (bits >> 31) & sign_mask;
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - (127 - erange);
  uint32_t mant = (bits & 0x7FFFFFu) >> (23 - mbits);
  mant = e < 0 ? 0u : mant;
  e = e < 0 ? 0 : e;
  e = e > erange ? erange : e;  // only a NaN gets here (u is clamped to [-1, 1]); keep reads in bounds
  uint32_t per_sign = static_cast<uint32_t>(erange + 1) << mbits;
  return sign * per_sign + (static_cast<uint32_t>(e) << mbits) + mant;
}

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
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vgolden = _mm256_set1_epi32(static_cast<int32_t>(kGolden)), vsalt = _mm256_set1_epi32(static_cast<int32_t>(salt));
  const __m256 vr = _mm256_set1_ps(1.0f / 16777216.0f);
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
      const __m256 l0 = lookup16(lev_lo8, lev_hi8, lo), l1 = lookup16(lev_lo8, lev_hi8, hi);
      const __m256 below = _mm256_sub_ps(u, l0), gap = _mm256_sub_ps(l1, l0);
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first_elem + static_cast<uint32_t>(i))), lane);
      const __m256i h = fmix32_avx2(_mm256_add_epi32(_mm256_mullo_epi32(idx, vgolden), vsalt));
      const __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), vr);
      const __m256 up = _mm256_cmp_ps(_mm256_mul_ps(r, gap), below, _CMP_LT_OQ);
      code = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), up));
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
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vgolden = _mm256_set1_epi32(static_cast<int32_t>(kGolden)), vsalt = _mm256_set1_epi32(static_cast<int32_t>(salt));
  const __m256 vr = _mm256_set1_ps(1.0f / 16777216.0f);
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
      const __m256 lev_lo = _mm256_i32gather_ps(m.levels, lo, 4);
      const __m256 lev_hi = _mm256_i32gather_ps(m.levels, hi, 4);
      const __m256 below = _mm256_sub_ps(u, lev_lo);
      const __m256 gap = _mm256_sub_ps(lev_hi, lev_lo);
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first_elem + static_cast<uint32_t>(i))), lane);
      const __m256i h = fmix32_avx2(_mm256_add_epi32(_mm256_mullo_epi32(idx, vgolden), vsalt));
      const __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), vr);
      const __m256 up = _mm256_cmp_ps(_mm256_mul_ps(r, gap), below, _CMP_LT_OQ);
      code = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), up));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), code);
  }
  return i;
}
#endif

template <int BITS>
void decode_block(const StateView& s, int64_t start, int64_t len, float scale, float* __restrict out) {
  const float* __restrict lev = s.map.levels;
  if (BITS == 8) {
    const uint8_t* __restrict c = s.codes + start;
    for (int64_t i = 0; i < len; ++i) out[i] = lev[c[i]] * scale;
  } else {  // start is even (block_size is even)
    const uint8_t* __restrict c = s.codes + (start >> 1);
    const int64_t pairs = len >> 1;
    for (int64_t j = 0; j < pairs; ++j) {
      out[2 * j] = lev[c[j] & 0xFu] * scale;
      out[2 * j + 1] = lev[c[j] >> 4] * scale;
    }
    if (len & 1) out[len - 1] = lev[c[pairs] & 0xFu] * scale;
  }
}

template <int BITS>
void encode_block(StateView& s, const float* __restrict buf, int32_t* __restrict tmp, int64_t start, int64_t len,
                  float scale) {
  int64_t done = 0;
  const uint32_t first = static_cast<uint32_t>(start);
#if defined(__AVX2__)
  if (s.map.num_levels <= 16) {
    done = s.stochastic ? encode_small_avx2<true>(s.map, buf, tmp, len, scale, s.salt, first)
                        : encode_small_avx2<false>(s.map, buf, tmp, len, scale, s.salt, first);
  } else {
    done = s.stochastic ? encode_values_avx2<true>(s.map, buf, tmp, len, scale, s.salt, first)
                        : encode_values_avx2<false>(s.map, buf, tmp, len, scale, s.salt, first);
  }
#endif
  if (s.stochastic) {
    encode_values<true>(s.map, buf + done, tmp + done, len - done, scale, s.salt, first + static_cast<uint32_t>(done));
  } else {
    encode_values<false>(s.map, buf + done, tmp + done, len - done, scale, s.salt, first + static_cast<uint32_t>(done));
  }
  if (BITS == 8) {
    uint8_t* __restrict c = s.codes + start;
    for (int64_t i = 0; i < len; ++i) c[i] = static_cast<uint8_t>(tmp[i]);
  } else {  // a tail of odd length pads its last high nibble with 0
    uint8_t* __restrict c = s.codes + (start >> 1);
    const int64_t pairs = len >> 1;
    for (int64_t j = 0; j < pairs; ++j) c[j] = static_cast<uint8_t>(tmp[2 * j] | (tmp[2 * j + 1] << 4));
    if (len & 1) c[pairs] = tmp[len - 1];
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

MapView map_view(const torch::Tensor& levels, const torch::Tensor& lut, int64_t mant_bits, int64_t exp_range,
                 bool is_signed, const torch::Tensor& mids, const torch::Tensor& mid_lut, int64_t mid_mant_bits,
                 int64_t mid_exp_range) {
  TORCH_CHECK(levels.dtype() == torch::kFloat32 && levels.is_contiguous(), "levels must be contiguous fp32");
  TORCH_CHECK(lut.dtype() == torch::kInt32 && lut.is_contiguous(), "bucket table must be contiguous int32");
  TORCH_CHECK(lut.numel() == ((exp_range + 1) << mant_bits) * (is_signed ? 2 : 1), "bucket table size mismatch");
  MapView m;
  m.levels = levels.data_ptr<float>();
  m.lut = lut.data_ptr<int32_t>();
  m.num_levels = static_cast<int>(levels.numel());
  m.mant_bits = static_cast<int>(mant_bits);
  m.exp_range = static_cast<int>(exp_range);
  m.is_signed = is_signed;
  TORCH_CHECK(mids.dtype() == torch::kFloat32 && mids.is_contiguous() && mids.numel() == levels.numel(),
              "midpoints must be contiguous fp32, one per level (the last +inf)");
  TORCH_CHECK(mid_lut.dtype() == torch::kInt32 && mid_lut.is_contiguous() &&
                  mid_lut.numel() == ((mid_exp_range + 1) << mid_mant_bits) * (is_signed ? 2 : 1),
              "midpoint bucket table size mismatch");
  m.mids = mids.data_ptr<float>();
  m.mid_lut = mid_lut.data_ptr<int32_t>();
  m.mid_mant_bits = static_cast<int>(mid_mant_bits);
  m.mid_exp_range = static_cast<int>(mid_exp_range);
  m.lo = m.levels[0];
  m.hi = m.levels[m.num_levels - 1];
  return m;
}

StateView state_view(torch::Tensor& codes, torch::Tensor& scales, const std::vector<torch::Tensor>& tables,
                     const std::vector<int64_t>& geometry, bool is_signed, bool stochastic, int64_t salt) {
  TORCH_CHECK(tables.size() == 4 && geometry.size() == 4,
              "expects tables (levels, lut, midpoints, mid_lut) and geometry (mant, exp, mid_mant, mid_exp)");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scales.is_contiguous(), "scales must be contiguous");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16,
              "scales must be fp32 or bf16");
  StateView s;
  s.codes = codes.data_ptr<uint8_t>();
  s.scales = scales.data_ptr();
  s.scale_bf16 = scales.dtype() == torch::kBFloat16;
  s.map = map_view(tables[0], tables[1], geometry[0], geometry[1], is_signed, tables[2], tables[3], geometry[2], geometry[3]);
  s.stochastic = stochastic;
  s.salt = static_cast<uint32_t>(salt);
  return s;
}

inline void adamw_update(float* __restrict p, const float* __restrict g, float* __restrict m,
                         float* __restrict v, int64_t len, float beta1, float beta2, float eps, float decay,
                         float step_size, float sqrt_bc2) {
  const float inv_sqrt_bc2 = 1.0f / sqrt_bc2;
  const float one_minus_b1 = 1.0f - beta1;
  const float one_minus_b2 = 1.0f - beta2;
  for (int64_t i = 0; i < len; ++i) {
    const float gi = g[i];
    const float mi = m[i] + one_minus_b1 * (gi - m[i]);
    const float vi = v[i] * beta2 + one_minus_b2 * (gi * gi);
    const float denom = std::sqrt(vi) * inv_sqrt_bc2 + eps;
    p[i] = p[i] * decay - step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

template <int MB, int VB>
void adamw_blocks(float* p, const float* g, StateView m, StateView v, int64_t n, int64_t block,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                  float sqrt_bc2) {
  const int64_t nblocks = (n + block - 1) / block;
  const float decay = 1.0f - lr * weight_decay;
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> mbuf(block), vbuf(block);
    std::vector<int32_t> tmp(block);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      const int64_t len = std::min(block, n - start);
      decode_block<MB>(m, start, len, load_scale(m, b), mbuf.data());
      decode_block<VB>(v, start, len, load_scale(v, b), vbuf.data());
      adamw_update(p + start, g + start, mbuf.data(), vbuf.data(), len, beta1, beta2, eps, decay, step_size,
                   sqrt_bc2);
      const float ms_new = store_scale(m, b, block_absmax(mbuf.data(), len));
      const float vs_new = store_scale(v, b, block_absmax(vbuf.data(), len));
      encode_block<MB>(m, mbuf.data(), tmp.data(), start, len, ms_new);
      encode_block<VB>(v, vbuf.data(), tmp.data(), start, len, vs_new);
    }
  });
}

}  // namespace

// Fused AdamW step over one parameter whose two moments are block-quantized.
// m_tables / v_tables: (levels, bucket table, midpoints, midpoint bucket table) of each moment's map;
// m_geometry / v_geometry: (mantissa bits, exponent range) of the two bucket tables.
void adamw_quantized_step(torch::Tensor p, torch::Tensor g, torch::Tensor m_codes, torch::Tensor m_scales,
                          std::vector<torch::Tensor> m_tables, std::vector<int64_t> m_geometry, bool m_signed,
                          int64_t m_bits, bool m_stochastic, int64_t m_salt, torch::Tensor v_codes,
                          torch::Tensor v_scales, std::vector<torch::Tensor> v_tables, std::vector<int64_t> v_geometry,
                          bool v_signed, int64_t v_bits, bool v_stochastic, int64_t v_salt, int64_t block_size, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double step_size, double sqrt_bc2) {
  TORCH_CHECK(p.dtype() == torch::kFloat32 && p.is_contiguous(), "param must be contiguous fp32");
  TORCH_CHECK(g.dtype() == torch::kFloat32 && g.is_contiguous(), "grad must be contiguous fp32");
  TORCH_CHECK(p.numel() == g.numel(), "param and grad sizes differ");
  TORCH_CHECK(block_size >= 2 && block_size % 2 == 0, "block_size must be even");
  StateView m = state_view(m_codes, m_scales, m_tables, m_geometry, m_signed, m_stochastic, m_salt);
  StateView v = state_view(v_codes, v_scales, v_tables, v_geometry, v_signed, v_stochastic, v_salt);
  const int64_t n = p.numel();
  float* pp = p.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  auto args = std::make_tuple(static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                              static_cast<float>(eps), static_cast<float>(weight_decay),
                              static_cast<float>(step_size), static_cast<float>(sqrt_bc2));
  auto run = [&](auto fn) {
    std::apply([&](auto... a) { fn(pp, gp, m, v, n, block_size, a...); }, args);
  };
  if (m_bits == 8 && v_bits == 8) run(adamw_blocks<8, 8>);
  else if (m_bits == 4 && v_bits == 4) run(adamw_blocks<4, 4>);
  else if (m_bits == 8 && v_bits == 4) run(adamw_blocks<8, 4>);
  else if (m_bits == 4 && v_bits == 8) run(adamw_blocks<4, 8>);
  else TORCH_CHECK(false, "bits must be 4 or 8");
}

// Fused AdamW step over one (R, C) matrix whose first moment is block-quantized and whose second moment is
// factored (state/factored.py: row means `row` (R), column means `col` (C), V_hat = outer(row, col) / mean(row)).
// Per row: decode m, form V_hat's row, apply the AdamW update (v = beta2 V_hat + (1 - beta2) g^2), re-encode m,
// and accumulate the new v's row and column sums in double. Rows are processed in fixed chunks whose column
// partial sums are added in chunk order, so the result does not depend on the number of threads (exact resume).
// Needs C % block_size == 0 (every quantization block inside one row). Same arithmetic as the reference path
// (HybridAdam with fused=False) up to the summation order of the means.
template <int MB>
void adamw_factored_rows(float* p, const float* g, StateView m, float* row, float* col, int64_t R, int64_t C,
                         int64_t block, float row_eps, float lr, float beta1, float beta2, float eps, float weight_decay,
                         float step_size, float sqrt_bc2) {
  double total = 0.0;
  for (int64_t i = 0; i < R; ++i) total += row[i];
  float scale = static_cast<float>(total / static_cast<double>(R));
  scale = scale > row_eps ? scale : row_eps;
  std::vector<float> rscaled(R);
  for (int64_t i = 0; i < R; ++i) rscaled[i] = row[i] / scale;
  const int64_t chunk = 32;
  const int64_t nchunks = (R + chunk - 1) / chunk;
  std::vector<double> colpart(static_cast<size_t>(nchunks * C), 0.0);
  std::vector<float> newrow(R);
  const float decay = 1.0f - lr * weight_decay;
  const int64_t per_row = C / block;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> mbuf(C), vbuf(C);
    std::vector<int32_t> tmp(block);
    StateView local = m;
    for (int64_t c = c0; c < c1; ++c) {
      double* cp = colpart.data() + c * C;
      const int64_t i1 = std::min(R, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < i1; ++i) {
        const int64_t first_block = i * per_row;
        for (int64_t k = 0; k < per_row; ++k)
          decode_block<MB>(local, (first_block + k) * block, block, load_scale(local, first_block + k), mbuf.data() + k * block);
        const float ri = rscaled[i];
        for (int64_t j = 0; j < C; ++j) vbuf[j] = ri * col[j];
        adamw_update(p + i * C, g + i * C, mbuf.data(), vbuf.data(), C, beta1, beta2, eps, decay, step_size, sqrt_bc2);
        for (int64_t k = 0; k < per_row; ++k) {
          const int64_t b = first_block + k;
          const float sc = store_scale(local, b, block_absmax(mbuf.data() + k * block, block));
          encode_block<MB>(local, mbuf.data() + k * block, tmp.data(), b * block, block, sc);
        }
        double rs = 0.0;
        for (int64_t j = 0; j < C; ++j) {
          rs += vbuf[j];
          cp[j] += vbuf[j];
        }
        newrow[i] = static_cast<float>(rs / static_cast<double>(C));
      }
    }
  });
  for (int64_t i = 0; i < R; ++i) row[i] = newrow[i];
  for (int64_t j = 0; j < C; ++j) {
    double t = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) t += colpart[c * C + j];
    col[j] = static_cast<float>(t / static_cast<double>(R));
  }
}

void adamw_quantized_factored_step(torch::Tensor p, torch::Tensor g, torch::Tensor m_codes, torch::Tensor m_scales,
                                   std::vector<torch::Tensor> m_tables, std::vector<int64_t> m_geometry, bool m_signed,
                                   int64_t m_bits, bool m_stochastic, int64_t m_salt, int64_t block_size,
                                   torch::Tensor row, torch::Tensor col, double row_eps, double lr, double beta1,
                                   double beta2, double eps, double weight_decay, double step_size, double sqrt_bc2) {
  TORCH_CHECK(p.dtype() == torch::kFloat32 && p.is_contiguous() && p.dim() == 2, "param must be a contiguous fp32 matrix");
  TORCH_CHECK(g.dtype() == torch::kFloat32 && g.is_contiguous() && g.sizes() == p.sizes(), "grad must match param");
  const int64_t R = p.size(0), C = p.size(1);
  TORCH_CHECK(row.dtype() == torch::kFloat32 && row.is_contiguous() && row.numel() == R, "row must be fp32 (R,)");
  TORCH_CHECK(col.dtype() == torch::kFloat32 && col.is_contiguous() && col.numel() == C, "col must be fp32 (C,)");
  TORCH_CHECK(block_size >= 2 && block_size % 2 == 0 && C % block_size == 0, "block_size must be even and divide C");
  TORCH_CHECK(m_scales.numel() == R * C / block_size, "scales size mismatch");
  StateView m = state_view(m_codes, m_scales, m_tables, m_geometry, m_signed, m_stochastic, m_salt);
  auto args = std::make_tuple(static_cast<float>(row_eps), static_cast<float>(lr), static_cast<float>(beta1),
                              static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
                              static_cast<float>(step_size), static_cast<float>(sqrt_bc2));
  auto run = [&](auto fn) {
    std::apply([&](auto... a) {
      fn(p.data_ptr<float>(), g.data_ptr<float>(), m, row.data_ptr<float>(), col.data_ptr<float>(), R, C, block_size, a...);
    }, args);
  };
  if (m_bits == 8) run(adamw_factored_rows<8>);
  else if (m_bits == 4) run(adamw_factored_rows<4>);
  else TORCH_CHECK(false, "bits must be 4 or 8");
}

// Block-wise quantize the contiguous fp32 tensor x into existing codes and scales: the same arithmetic as
// quantize_blockwise() in quant/blockwise.py (scale = block absmax, bf16 rounded up; codes through the
// map's bucket tables; stochastic draws keyed by the element's flat index and salt). Used by the
// Quantized codec for every rule (Lion, SGD, Adafactor, HybridAdam, ...). x must be finite.
void quantize_into(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, std::vector<torch::Tensor> tables,
                   std::vector<int64_t> geometry, bool is_signed, int64_t bits, bool stochastic, int64_t salt,
                   int64_t block_size) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(block_size >= 2 && (bits == 8 || block_size % 2 == 0), "block_size must be >= 2 (even at 4 bits)");
  StateView s = state_view(codes, scales, tables, geometry, is_signed, stochastic, salt);
  const int64_t n = x.numel();
  const int64_t nblocks = (n + block_size - 1) / block_size;
  TORCH_CHECK(codes.numel() == (bits == 8 ? n : (n + 1) / 2), "codes size mismatch");
  TORCH_CHECK(scales.numel() == nblocks, "scales size mismatch");
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> tmp(block_size);
    StateView local = s;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t len = std::min(block_size, n - start);
      const float scale = store_scale(local, b, block_absmax(xp + start, len));
      if (bits == 8) encode_block<8>(local, xp + start, tmp.data(), start, len, scale);
      else encode_block<4>(local, xp + start, tmp.data(), start, len, scale);
    }
  });
}

// Decode codes and scales into the contiguous fp32 tensor out (dequantize_blockwise() of the reference).
void dequantize_into(torch::Tensor codes, torch::Tensor scales, torch::Tensor levels, int64_t bits,
                     int64_t block_size, torch::Tensor out) {
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous(), "out must be contiguous fp32");
  TORCH_CHECK(levels.dtype() == torch::kFloat32 && levels.is_contiguous(), "levels must be contiguous fp32");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && (scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16),
              "scales must be contiguous fp32 or bf16");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(block_size >= 2 && (bits == 8 || block_size % 2 == 0), "block_size must be >= 2 (even at 4 bits)");
  const int64_t n = out.numel();
  const int64_t nblocks = (n + block_size - 1) / block_size;
  TORCH_CHECK(codes.numel() == (bits == 8 ? n : (n + 1) / 2), "codes size mismatch");
  TORCH_CHECK(scales.numel() == nblocks, "scales size mismatch");
  StateView s;
  s.codes = codes.data_ptr<uint8_t>();
  s.scales = scales.data_ptr();
  s.scale_bf16 = scales.dtype() == torch::kBFloat16;
  s.map.levels = levels.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t len = std::min(block_size, n - start);
      if (bits == 8) decode_block<8>(s, start, len, load_scale(s, b), op + start);
      else decode_block<4>(s, start, len, load_scale(s, b), op + start);
    }
  });
}

// True if any element of the fp32 tensor is NaN or Inf (checked on the bit pattern).
bool any_nonfinite_f32(torch::Tensor t) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "expects a contiguous fp32 tensor");
  const uint32_t* b = reinterpret_cast<const uint32_t*>(t.data_ptr<float>());
  const int64_t n = t.numel();
  const int64_t chunk = 1 << 16;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<uint8_t> found(static_cast<size_t>(std::max<int64_t>(nchunks, 1)), 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = c * chunk, e = std::min(n, s + chunk);
      uint32_t acc = 0;
      for (int64_t i = s; i < e; ++i) acc |= ((b[i] & 0x7F800000u) == 0x7F800000u);
      found[c] = static_cast<uint8_t>(acc);
    }
  });
  for (auto f : found)
    if (f) return true;
  return false;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("adamw_quantized_step", &adamw_quantized_step, "fused block-quantized AdamW step (CPU)");
  mod.def("any_nonfinite_f32", &any_nonfinite_f32, "NaN/Inf check on the bit pattern (CPU)");
  mod.def("adamw_quantized_factored_step", &adamw_quantized_factored_step,
          "fused AdamW step, block-quantized m and factored (row/column) v (CPU)");
  mod.def("quantize_into", &quantize_into, "block-wise quantize fp32 into codes and scales (CPU)");
  mod.def("dequantize_into", &dequantize_into, "block-wise dequantize codes and scales into fp32 (CPU)");
}
