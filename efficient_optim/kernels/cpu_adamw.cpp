// Fused block-wise quantized AdamW step for the CPU.
//
// One pass per block of `block_size` elements: decode m and v (level table x block scale), apply the
// AdamW update to the fp32 parameter, find the new block maxima, round the scales, re-encode both
// moments. No temporaries outside a per-thread block buffer.
//
// The arithmetic mirrors efficient_optim/quant/blockwise.py (the reference) step by step: same scale
// rounding, same nearest / floor level index, same counter-based hash for stochastic rounding.
//
// The pieces live in headers included only here: cpu_maps.h (map and state views, closed-form maps, the
// AdamW scalars), cpu_avx2_closed.h and cpu_avx512.h (the vector paths), cpu_codec.h (one block's
// encode/decode, every path).
#include <ATen/Parallel.h>

#include "cpu_codec.h"

namespace {

inline void adamw_update(float* __restrict p, const float* __restrict g, float* __restrict m,
                         float* __restrict v, int64_t len, const AdamScalars& a) {
  int64_t i = 0;
#if defined(EFFOPT_HAVE_AVX512)
  i = adamw_update512(p, g, m, v, len, a);
#endif
  for (; i < len; ++i) {
    const float gi = g[i];
    const float mi = m[i] + a.one_minus_b1 * (gi - m[i]);
    const float vi = v[i] * a.beta2 + a.one_minus_b2 * (gi * gi);
    const float denom = std::sqrt(vi) * a.inv_sqrt_bc2 + a.eps;
    p[i] = p[i] * a.decay - a.step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

// Largest |x| of x[0 .. len) as a bit pattern (block_absmax's integer max), combined with `best`.
inline uint32_t absmax_bits(const float* __restrict x, int64_t len, uint32_t best) {
  const float a = block_absmax(x, len);
  const uint32_t b = float_to_bits(a);
  return b > best ? b : best;
}

// One block: decode both moments, update the parameter, then re-encode both moments at their new scales.
// The AVX-512 pass (cpu_avx512.h) takes the multiple-of-16 part when both maps allow it; the rest (or all of
// the block) takes the portable loops; both compute the same values.
template <int MB, int VB>
void adamw_block(float* p, const float* g, StateView& m, const FastState& mf, StateView& v, const FastState& vf,
                 int64_t b, int64_t start, int64_t len, const AdamScalars& a, float* mbuf, float* vbuf, int32_t* tmp) {
  const float ms = load_scale(m, b), vs = load_scale(v, b);
  int64_t done = 0;
  uint32_t mmax = 0, vmax = 0;
#if defined(EFFOPT_HAVE_AVX512)
  done = adamw_block512<MB, VB>(p + start, g + start, m, mf, v, vf, start, len, ms, vs, a, mbuf, vbuf, &mmax, &vmax);
#endif
  if (done < len) {
    decode_block<MB>(m, mf, start + done, len - done, ms, mbuf + done);
    decode_block<VB>(v, vf, start + done, len - done, vs, vbuf + done);
    adamw_update(p + start + done, g + start + done, mbuf + done, vbuf + done, len - done, a);
    mmax = absmax_bits(mbuf + done, len - done, mmax);
    vmax = absmax_bits(vbuf + done, len - done, vmax);
  }
  const float ms_new = store_scale(m, b, bits_to_float(mmax));
  const float vs_new = store_scale(v, b, bits_to_float(vmax));
  encode_block<MB>(m, mf, mbuf, tmp, start, len, ms_new);
  encode_block<VB>(v, vf, vbuf, tmp, start, len, vs_new);
}

template <int MB, int VB>
void adamw_blocks(float* p, const float* g, StateView m, StateView v, int64_t n, int64_t block,
                  float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                  float sqrt_bc2) {
  const int64_t nblocks = (n + block - 1) / block;
  const AdamScalars a(beta1, beta2, eps, 1.0f - lr * weight_decay, step_size, sqrt_bc2);
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> mbuf(block), vbuf(block);
    std::vector<int32_t> tmp(block);
    StateView ml = m, vl = v;
    const FastState mfast(ml), vfast(vl);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block;
      adamw_block<MB, VB>(p, g, ml, mfast, vl, vfast, b, start, std::min(block, n - start), a, mbuf.data(),
                          vbuf.data(), tmp.data());
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

// The sum of v[0 .. C) in double, and v added into the column partial sums cp. Eight interleaved partial sums
// (v[j] goes to partial j % 8) combined pairwise, then the tail in order: a fixed order (independent of threads),
// and no serial chain of dependent additions (one such chain cost half of the step).
inline double sum_partials8(const double* q, double tail) {
  return (((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]))) + tail;
}

inline double row_sum_and_add(const float* __restrict v, double* __restrict cp, int64_t C) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= C; j += 8) {
    for (int l = 0; l < 8; ++l) {
      const double x = v[j + l];
      part[l] += x;
      cp[j + l] += x;
    }
  }
  double tail = 0.0;
  for (; j < C; ++j) {
    tail += v[j];
    cp[j] += v[j];
  }
  return sum_partials8(part, tail);
}

#if defined(EFFOPT_HAVE_AVX512)
// One row of adamw_factored_rows on the AVX-512 path (needs decodes512 and block % 16 == 0): per quantization
// block, m decoded 16 at a time, V_hat's row formed on the fly (ri * col), the AdamW update (adamw_update's
// operations), the block maximum, the new v summed into eight double partials in row_sum_and_add's order and
// added to the column partials, then the block re-encoded. Returns the row's sum of the new v.
template <int MB>
double factored_row512(float* p, const float* g, StateView& m, const FastState& fast, int64_t first_block,
                       int64_t per_row, int64_t block, float ri, const float* col, const AdamScalars& a, float* mbuf,
                       int32_t* tmp, double* cp) {
  const Adam512 adam(a);
  const __m512 vri = _mm512_set1_ps(ri);
  __m512d part = _mm512_setzero_pd();
  for (int64_t k = 0; k < per_row; ++k) {
    const int64_t b = first_block + k, off = k * block;
    __m512i best = _mm512_setzero_si512();
    with_decoder512<MB>(m, fast, b * block, load_scale(m, b), [&](auto decode_m) {
      for (int64_t i = 0; i < block; i += 16) {
        const int64_t j = off + i;
        __m512 mi, vi;
        adam(p + j, _mm512_loadu_ps(g + j), decode_m(i), _mm512_mul_ps(vri, _mm512_loadu_ps(col + j)), mi, vi);
        _mm512_storeu_ps(mbuf + j, mi);
        best = absmax_bits512(best, mi);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(vi));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(vi), 1)));
        part = _mm512_add_pd(_mm512_add_pd(part, lo), hi);
        _mm512_storeu_pd(cp + j, _mm512_add_pd(_mm512_loadu_pd(cp + j), lo));
        _mm512_storeu_pd(cp + j + 8, _mm512_add_pd(_mm512_loadu_pd(cp + j + 8), hi));
      }
    });
    const float sc = store_scale(m, b, bits_to_float(_mm512_reduce_max_epu32(best)));
    encode_block<MB>(m, fast, mbuf + off, tmp, b * block, block, sc);
  }
  alignas(64) double q[8];
  _mm512_store_pd(q, part);
  return sum_partials8(q, 0.0);  // row_sum_and_add's order
}
#endif

// Fused AdamW step over one (R, C) matrix whose first moment is block-quantized and whose second moment is
// factored (state/factored.py: row means `row` (R), column means `col` (C), V_hat = outer(row, col) / mean(row)).
// Per row: decode m, form V_hat's row, apply the AdamW update (v = beta2 V_hat + (1 - beta2) g^2), re-encode m,
// and accumulate the new v's row sums (row_sum_and_add's order) and column sums in double. Rows are processed
// in fixed chunks whose column partial sums are added in chunk order, so the result does not depend on the number of threads (exact resume).
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
  const AdamScalars a(beta1, beta2, eps, 1.0f - lr * weight_decay, step_size, sqrt_bc2);
  const int64_t per_row = C / block;
#if defined(EFFOPT_HAVE_AVX512)
  const bool fast_rows = decodes512<MB>(m) && block % 16 == 0;
#endif
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> mbuf(C), vbuf(C);
    std::vector<int32_t> tmp(block);
    StateView local = m;
    const FastState fast(local);
    for (int64_t c = c0; c < c1; ++c) {
      double* cp = colpart.data() + c * C;
      const int64_t i1 = std::min(R, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < i1; ++i) {
        const int64_t first_block = i * per_row;
#if defined(EFFOPT_HAVE_AVX512)
        if (fast_rows) {
          const double rs = factored_row512<MB>(p + i * C, g + i * C, local, fast, first_block, per_row, block,
                                                rscaled[i], col, a, mbuf.data(), tmp.data(), cp);
          newrow[i] = static_cast<float>(rs / static_cast<double>(C));
          continue;
        }
#endif
        for (int64_t k = 0; k < per_row; ++k)
          decode_block<MB>(local, fast, (first_block + k) * block, block, load_scale(local, first_block + k), mbuf.data() + k * block);
        const float ri = rscaled[i];
        for (int64_t j = 0; j < C; ++j) vbuf[j] = ri * col[j];
        adamw_update(p + i * C, g + i * C, mbuf.data(), vbuf.data(), C, a);
        for (int64_t k = 0; k < per_row; ++k) {
          const int64_t b = first_block + k;
          const float sc = store_scale(local, b, block_absmax(mbuf.data() + k * block, block));
          encode_block<MB>(local, fast, mbuf.data() + k * block, tmp.data(), b * block, block, sc);
        }
        newrow[i] = static_cast<float>(row_sum_and_add(vbuf.data(), cp, C) / static_cast<double>(C));
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
    const FastState fast(local);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t len = std::min(block_size, n - start);
      const float scale = store_scale(local, b, block_absmax(xp + start, len));
      if (bits == 8) encode_block<8>(local, fast, xp + start, tmp.data(), start, len, scale);
      else encode_block<4>(local, fast, xp + start, tmp.data(), start, len, scale);
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
  s.map = MapView{};  // a decode-only view: levels, no bucket tables or midpoints
  s.map.levels = levels.data_ptr<float>();
  s.map.num_levels = static_cast<int>(levels.numel());
  s.map.form = kTable;
  s.stochastic = false;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    const FastState fast(s);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block_size;
      const int64_t len = std::min(block_size, n - start);
      if (bits == 8) decode_block<8>(s, fast, start, len, load_scale(s, b), op + start);
      else decode_block<4>(s, fast, start, len, load_scale(s, b), op + start);
    }
  });
}

// Whether b[s .. e) (fp32 bit patterns) holds a NaN or Inf: the largest exponent field, an unsigned max
// reduction that vectorizes (the scan runs at memory speed).
inline bool has_nonfinite(const uint32_t* __restrict b, int64_t s, int64_t e) {
  uint32_t top = 0;
  for (int64_t i = s; i < e; ++i) {
    const uint32_t x = b[i] & 0x7F800000u;
    top = x > top ? x : top;
  }
  return top == 0x7F800000u;
}

// Position in `ts` of the first fp32 tensor holding a NaN or Inf, or -1: every tensor's chunks in one
// parallel region (one call for a whole model instead of one per tensor; the per-call start-up of the threads
// cost as much as the reading on a model of 144 tensors).
int64_t first_nonfinite_f32(std::vector<torch::Tensor> ts) {
  const int64_t chunk = 1 << 16;
  std::vector<std::pair<int64_t, int64_t>> parts;  // (tensor, first element) of every chunk
  for (size_t t = 0; t < ts.size(); ++t) {
    TORCH_CHECK(ts[t].dtype() == torch::kFloat32 && ts[t].is_contiguous(), "expects contiguous fp32 tensors");
    for (int64_t s = 0; s < ts[t].numel(); s += chunk) parts.emplace_back(static_cast<int64_t>(t), s);
  }
  std::vector<uint8_t> found(parts.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const torch::Tensor& x = ts[parts[c].first];
      const uint32_t* b = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
      const int64_t s = parts[c].second, e = std::min(x.numel(), s + chunk);
      found[c] = static_cast<uint8_t>(has_nonfinite(b, s, e));
    }
  });
  for (size_t c = 0; c < parts.size(); ++c)
    if (found[c]) return parts[c].first;
  return -1;
}

// True if any element of the fp32 tensor is NaN or Inf (checked on the bit pattern).
bool any_nonfinite_f32(torch::Tensor t) { return first_nonfinite_f32({t}) >= 0; }

// How the kernel finds the levels of a map (0: tables; 1: the sqrt_nozero formula; 2: the signed sqrt formula).
int64_t map_form(torch::Tensor levels, bool is_signed) {
  TORCH_CHECK(levels.dtype() == torch::kFloat32 && levels.is_contiguous() && levels.numel() >= 2,
              "levels must be contiguous fp32");
  MapView m{};
  m.levels = levels.data_ptr<float>();
  m.num_levels = static_cast<int>(levels.numel());
  m.is_signed = is_signed;
  detect_form(m);
  return m.form;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("map_form", &map_form, "0 = table map, 1 / 2 = closed-form map the kernel computes (CPU)");
  mod.def("adamw_quantized_step", &adamw_quantized_step, "fused block-quantized AdamW step (CPU)");
  mod.def("any_nonfinite_f32", &any_nonfinite_f32, "NaN/Inf check on the bit pattern (CPU)");
  mod.def("first_nonfinite_f32", &first_nonfinite_f32, "position of the first tensor with a NaN/Inf, or -1 (CPU)");
  mod.def("adamw_quantized_factored_step", &adamw_quantized_factored_step,
          "fused AdamW step, block-quantized m and factored (row/column) v (CPU)");
  mod.def("quantize_into", &quantize_into, "block-wise quantize fp32 into codes and scales (CPU)");
  mod.def("dequantize_into", &dequantize_into, "block-wise dequantize codes and scales into fp32 (CPU)");
}
