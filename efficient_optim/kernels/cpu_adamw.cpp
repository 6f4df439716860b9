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

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kExpRange = 32;  // must equal LUT_EXP_RANGE in quant/maps.py
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
  const uint8_t* lut;
  int num_levels;
  int mant_bits;
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

// Code of one value given the block scale; identical to encode_normalized() in the reference.
inline uint32_t encode_one(const MapView& m, float x, float scale, bool stochastic, uint32_t salt,
                           uint32_t elem) {
  float u = scale > 0.0f ? x / scale : 0.0f;
  u = u < m.lo ? m.lo : (u > m.hi ? m.hi : u);
  uint32_t bits = float_to_bits(u);
  uint32_t sign = bits >> 31;
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - (127 - kExpRange);
  uint32_t mant = (bits & 0x7FFFFFu) >> (23 - m.mant_bits);
  if (e < 0) {
    e = 0;
    mant = 0;
  }
  if (e > kExpRange) e = kExpRange;  // only a NaN gets here (u is clamped to [-1, 1]); keep the read in bounds
  uint32_t per_sign = static_cast<uint32_t>(kExpRange + 1) << m.mant_bits;
  uint32_t key = sign * per_sign + (static_cast<uint32_t>(e) << m.mant_bits) + mant;
  int32_t lo = m.lut[key];
  int32_t nxt = lo + 1 < m.num_levels ? lo + 1 : lo;
  lo = (nxt > lo && m.levels[nxt] <= u) ? nxt : lo;
  int32_t hi = lo + 1 < m.num_levels ? lo + 1 : lo;
  float below = u - m.levels[lo];
  float gap = m.levels[hi] - m.levels[lo];
  bool up;
  if (stochastic) {
    float r = static_cast<float>(fmix32(elem * kGolden + salt) >> 8) * (1.0f / 16777216.0f);
    up = r * gap < below;
  } else {
    up = (gap - below) < below;
  }
  return static_cast<uint32_t>(up ? hi : lo);
}

template <int BITS>
inline float decode_one(const StateView& s, int64_t i, float scale) {
  uint32_t code;
  if (BITS == 8) {
    code = s.codes[i];
  } else {
    code = (s.codes[i >> 1] >> ((i & 1) * 4)) & 0xFu;
  }
  return s.map.levels[code] * scale;
}

template <int BITS>
inline void encode_block(StateView& s, const float* buf, int64_t start, int64_t len, float scale) {
  if (BITS == 8) {
    for (int64_t i = 0; i < len; ++i) {
      s.codes[start + i] = static_cast<uint8_t>(
          encode_one(s.map, buf[i], scale, s.stochastic, s.salt, static_cast<uint32_t>(start + i)));
    }
  } else {  // start is even (block_size is even); a tail of odd length pads its last high nibble with 0
    for (int64_t i = 0; i < len; i += 2) {
      uint32_t lo = encode_one(s.map, buf[i], scale, s.stochastic, s.salt, static_cast<uint32_t>(start + i));
      uint32_t hi = 0;
      if (i + 1 < len) {
        hi = encode_one(s.map, buf[i + 1], scale, s.stochastic, s.salt, static_cast<uint32_t>(start + i + 1));
      }
      s.codes[(start + i) >> 1] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

MapView map_view(const torch::Tensor& levels, const torch::Tensor& lut, int64_t mant_bits) {
  TORCH_CHECK(levels.dtype() == torch::kFloat32 && levels.is_contiguous(), "levels must be contiguous fp32");
  TORCH_CHECK(lut.dtype() == torch::kUInt8 && lut.is_contiguous(), "bucket table must be contiguous uint8");
  MapView m;
  m.levels = levels.data_ptr<float>();
  m.lut = lut.data_ptr<uint8_t>();
  m.num_levels = static_cast<int>(levels.numel());
  m.mant_bits = static_cast<int>(mant_bits);
  m.lo = m.levels[0];
  m.hi = m.levels[m.num_levels - 1];
  return m;
}

StateView state_view(torch::Tensor& codes, torch::Tensor& scales, const torch::Tensor& levels,
                     const torch::Tensor& lut, int64_t mant_bits, bool stochastic, int64_t salt) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scales.is_contiguous(), "scales must be contiguous");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16,
              "scales must be fp32 or bf16");
  StateView s;
  s.codes = codes.data_ptr<uint8_t>();
  s.scales = scales.data_ptr();
  s.scale_bf16 = scales.dtype() == torch::kBFloat16;
  s.map = map_view(levels, lut, mant_bits);
  s.stochastic = stochastic;
  s.salt = static_cast<uint32_t>(salt);
  return s;
}

template <int MB, int VB>
void adamw_blocks(float* p, const float* g, StateView m, StateView v, int64_t n, int64_t block,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                  float sqrt_bc2) {
  const int64_t nblocks = (n + block - 1) / block;
  const float decay = 1.0f - lr * weight_decay;
  const float one_minus_b1 = 1.0f - beta1;
  const float one_minus_b2 = 1.0f - beta2;
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> mbuf(block), vbuf(block);
    float* mb = mbuf.data();
    float* vb = vbuf.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      const int64_t len = std::min(block, n - start);
      const float ms = load_scale(m, b);
      const float vs = load_scale(v, b);
      float* pb = p + start;
      const float* gb = g + start;
      float mmax = 0.0f, vmax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        float mi = decode_one<MB>(m, start + i, ms);
        float vi = decode_one<VB>(v, start + i, vs);
        float gi = gb[i];
        mi = mi + one_minus_b1 * (gi - mi);
        vi = vi * beta2 + one_minus_b2 * (gi * gi);
        float denom = std::sqrt(vi) / sqrt_bc2 + eps;
        pb[i] = pb[i] * decay - step_size * (mi / denom);
        mb[i] = mi;
        vb[i] = vi;
        float am = std::fabs(mi);
        mmax = am > mmax ? am : mmax;
        vmax = vi > vmax ? vi : vmax;
      }
      const float ms_new = store_scale(m, b, mmax);
      const float vs_new = store_scale(v, b, vmax);
      encode_block<MB>(m, mb, start, len, ms_new);
      encode_block<VB>(v, vb, start, len, vs_new);
    }
  });
}

}  // namespace

// Fused AdamW step over one parameter whose two moments are block-quantized.
void adamw_quantized_step(torch::Tensor p, torch::Tensor g, torch::Tensor m_codes, torch::Tensor m_scales,
                          torch::Tensor m_levels, torch::Tensor m_lut, int64_t m_mant_bits, int64_t m_bits,
                          bool m_stochastic, int64_t m_salt, torch::Tensor v_codes, torch::Tensor v_scales,
                          torch::Tensor v_levels, torch::Tensor v_lut, int64_t v_mant_bits, int64_t v_bits,
                          bool v_stochastic, int64_t v_salt, int64_t block_size, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double step_size, double sqrt_bc2) {
  TORCH_CHECK(p.dtype() == torch::kFloat32 && p.is_contiguous(), "param must be contiguous fp32");
  TORCH_CHECK(g.dtype() == torch::kFloat32 && g.is_contiguous(), "grad must be contiguous fp32");
  TORCH_CHECK(p.numel() == g.numel(), "param and grad sizes differ");
  TORCH_CHECK(block_size >= 2 && block_size % 2 == 0, "block_size must be even");
  StateView m = state_view(m_codes, m_scales, m_levels, m_lut, m_mant_bits, m_stochastic, m_salt);
  StateView v = state_view(v_codes, v_scales, v_levels, v_lut, v_mant_bits, v_stochastic, v_salt);
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
}
