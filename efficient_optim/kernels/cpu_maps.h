// Shared pieces of the fused CPU kernels: the views of a quantization map and of a quantized state, the
// block scale, the bucket key of the table encoders, the counter hash of stochastic rounding, and the
// closed-form maps (maps whose levels the kernel can compute instead of looking them up).
//
// Included once, by cpu_adamw.cpp (one translation unit).
#pragma once

#include <torch/extension.h>

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
  int form;      // MapForm: how the kernel finds levels (detected from the table in map_view)
  int half;      // kSquareSigned: h (levels at j = -h..h); kSqrtUnsigned: the level count n
  float coef;    // kSquareSigned: 1/h^2 in fp32; kSqrtUnsigned: 1/n
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

// The AdamW step's scalars in fp32, computed once per call (every path takes them from here).
struct AdamScalars {
  float beta1, beta2, eps, decay, step_size, inv_sqrt_bc2, one_minus_b1, one_minus_b2;
  AdamScalars(float beta1_, float beta2_, float eps_, float decay_, float step_size_, float sqrt_bc2)
      : beta1(beta1_), beta2(beta2_), eps(eps_), decay(decay_), step_size(step_size_), inv_sqrt_bc2(1.0f / sqrt_bc2),
        one_minus_b1(1.0f - beta1_), one_minus_b2(1.0f - beta2_) {}
};

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

// ------------------------------------------------------------------------------------------ closed-form maps
// Two maps have levels the kernel can compute exactly, bit for bit the table's fp32 values, so it encodes and
// decodes them with arithmetic instead of table reads (no gathers):
//   kSqrtUnsigned  ("sqrt_nozero", unsigned, n = 16 or 256 levels): level(j) = ((j + 1) / n)^2, j = 0..n-1,
//                  every level and every midpoint exact in fp32;
//   kSquareSigned  ("sqrt", signed, 2h + 1 levels, h = 7 or 127): level(k) = clamp(j * |j| * c, -1, 1) with
//                  j = k - h and c = 1 / h^2 rounded to fp32, computed in fp32 exactly as quant/maps.py does.
// A map is treated as closed-form only when its table equals the formula at every level (map_view checks), so
// the closed-form path returns what the table path returns by construction; anything else keeps the tables.
enum MapForm : int { kTable = 0, kSqrtUnsigned = 1, kSquareSigned = 2 };

inline float sqrt_level(int32_t j, float inv_n) {
  const float t = static_cast<float>(j + 1) * inv_n;
  return t * t;
}

inline float square_level(int32_t k, int32_t h, float c) {
  const float jf = static_cast<float>(k - h);
  float l = (jf * std::fabs(jf)) * c;
  l = l > 1.0f ? 1.0f : l;
  return l < -1.0f ? -1.0f : l;
}

inline bool same_bits(float a, float b) { return float_to_bits(a) == float_to_bits(b); }

// Sets m.form (and its constants) when the level table is one of the closed forms above.
inline void detect_form(MapView& m) {
  m.form = kTable;
  const int n = m.num_levels;
  if (!m.is_signed && (n == 16 || n == 256)) {
    const float inv = 1.0f / static_cast<float>(n);
    bool ok = true;
    for (int j = 0; j < n && ok; ++j) ok = same_bits(m.levels[j], sqrt_level(j, inv));
    if (ok) {
      m.form = kSqrtUnsigned;
      m.half = n;
      m.coef = inv;
    }
    return;
  }
  if (m.is_signed && (n == 15 || n == 255)) {
    const int h = (n - 1) / 2;
    const float c = 1.0f / static_cast<float>(h * h);
    bool ok = static_cast<float>(h * h) * c <= 1.0f;  // then the clamp never acts: the vector paths omit it
    for (int k = 0; k < n && ok; ++k) ok = same_bits(m.levels[k], square_level(k, h, c));
    if (ok) {
      m.form = kSquareSigned;
      m.half = h;
      m.coef = c;
    }
  }
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
  detect_form(m);
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
}  // namespace
