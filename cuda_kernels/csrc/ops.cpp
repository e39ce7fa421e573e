// The CPU kernels of the fused ops (schemas and argument checks: fa_ops.cpp; math: fa_math.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define FA_AVX2 1
#endif

#include "fa_math.h"
#include "fa_ops.h"

namespace fa {

namespace {

// Work (elements) below which a parallel_for runs inline: waking the pool costs more than the work.
constexpr int64_t kGrainElems = 1 << 17;

inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// Global average pool over H, W of [N,C,H,W] (or a cast of an already pooled [N,C]) into the opmath [N,C] `out`:
// one pass over the input through ATen's vectorised reduction, which vectorises across rows when H*W is small
// (a row-at-a-time loop is bound by its horizontal sums there), contiguous and channels_last alike.
void pool_cpu_into(const at::Tensor& x, at::Tensor& out) {
  if (x.dim() == 2) {
    out.copy_(x);
  } else {
    at::mean_out(out, x, {2, 3}, /*keepdim=*/false, out.scalar_type());
  }
}

// <a, b> with 8 independent partial sums: a serial chain of additions would be latency-bound (4 cycles each).
template <typename acc_t>
inline acc_t dot8(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += a[i + k] * b[i + k];
  acc_t s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc_t>
void cosine_rows(const acc_t* s, const acc_t* t, int64_t J, int64_t N, int64_t C, int64_t n, acc_t eps,
                 CosineRow<acc_t>* rows) {
  const acc_t* sn = s + n * C;
  const acc_t ss = dot8(sn, sn, C);
  for (int64_t j = 0; j < J; ++j) {
    const acc_t* tj = t + (j * N + n) * C;
    rows[j] = cosine_row(dot8(sn, tj, C), ss, dot8(tj, tj, C), eps);
  }
}

// ---- float32 fast path of the forward for small maps (the stride-32 layers the alignment taps): one parallel
// pass in which each batch row n pools the student and every target, computes its cosines and its gradient
// coefficients, with no intermediate ATen reductions or extra thread-pool wake-ups (at this size those fixed
// costs were most of the op).
enum class PoolLayout { Pooled, Nchw, ChannelsLast };

// Maps above this many positions go through ATen's mean instead: with long rows the fixed costs no longer
// dominate, and ATen's reduction streams them faster than eight interleaved rows (measured: 2.6 against 5.7 ms
// for three [64,1024,13,13] maps).
constexpr int64_t kFastPathMaxHW = 64;

inline bool fast_layout(const at::Tensor& x, PoolLayout* layout) {
  if (x.scalar_type() != at::kFloat) return false;
  if (x.dim() == 2) {
    *layout = PoolLayout::Pooled;
    return x.is_contiguous();
  }
  if (x.size(2) * x.size(3) > kFastPathMaxHW) return false;
  if (x.is_contiguous()) {
    *layout = PoolLayout::Nchw;
    return true;
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *layout = PoolLayout::ChannelsLast;
    return true;
  }
  return false;
}

// sum of n floats with 8 independent partial sums (a single chain would be latency-bound; vectorised by the compiler)
inline float sum8(const float* a, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) p[k] += a[i + k];
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; i < n; ++i) s += a[i];
  return s;
}

// means of `rows` contiguous rows of HW floats
inline void pool_rows_contiguous(const float* p, int64_t rows, int64_t HW, float inv, float* out) {
  int64_t r = 0;
#ifdef FA_AVX2
  const int64_t HW8 = HW & ~int64_t(7);
  if (HW8 > 0) {
    // eight rows at a time: vertical adds within each row, then one hadd tree turns the eight row vectors into
    // one vector of eight row sums (a horizontal sum per row would cost as much as the loads); the last
    // HW - HW8 elements of each row are added as scalars
    const bool has_tail = HW8 != HW;
    for (; r + 8 <= rows; r += 8) {
      __m256 a[8];  // eight independent accumulation chains (row k's sum is in a[k])
      const float* q = p + r * HW;
      for (int k = 0; k < 8; ++k) a[k] = _mm256_loadu_ps(q + k * HW);
      for (int64_t v = 8; v < HW8; v += 8)
        for (int k = 0; k < 8; ++k) a[k] = _mm256_add_ps(a[k], _mm256_loadu_ps(q + k * HW + v));
      const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
      const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
      const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
      _mm256_storeu_ps(out + r, _mm256_mul_ps(sum, _mm256_set1_ps(inv)));
      if (has_tail)  // the last HW - HW8 elements of each row, added after the vector part
        for (int k = 0; k < 8; ++k) {
          const float* q = p + (r + k) * HW;
          float t = 0.f;
          for (int64_t v = HW8; v < HW; ++v) t += q[v];
          out[r + k] += t * inv;
        }
    }
  }
#endif
  for (; r < rows; ++r) out[r] = sum8(p + r * HW, HW) * inv;
}

// row n of a [N,C,H,W] (either layout) or pooled [N,C] float tensor, averaged over H, W into out[0..C)
inline void pool_row(const float* x, PoolLayout layout, int64_t n, int64_t C, int64_t HW, float* out) {
  const float inv = 1.0f / static_cast<float>(HW);
  switch (layout) {
    case PoolLayout::Pooled:
      std::copy(x + n * C, x + (n + 1) * C, out);
      return;
    case PoolLayout::Nchw:
      pool_rows_contiguous(x + n * C * HW, C, HW, inv, out);
      return;
    case PoolLayout::ChannelsLast: {
      const float* p = x + n * HW * C;
      std::fill(out, out + C, 0.f);
      for (int64_t i = 0; i < HW; ++i)
        for (int64_t c = 0; c < C; ++c) out[c] += p[i * C + c];  // contiguous over c: vectorised
      for (int64_t c = 0; c < C; ++c) out[c] *= inv;
      return;
    }
  }
}

// d loss / d student of row n for an upstream gradient of 1, constant over H, W:
// scale * (sum_j w_j beta_j * s - sum_j w_j alpha_j * t_j), one contiguous, vectorised loop per term
template <typename acc_t>
inline void coef_row(const acc_t* s, const acc_t* t, const CosineRow<acc_t>* rows, const acc_t* w, int64_t J,
                     int64_t N, int64_t C, int64_t n, acc_t scale, acc_t* g) {
  acc_t bsum = 0;
  for (int64_t j = 0; j < J; ++j) bsum += w[j] * rows[j].beta;
  const acc_t* sn = s + n * C;
  acc_t* gn = g + n * C;
  const acc_t bs = bsum * scale;
  for (int64_t c = 0; c < C; ++c) gn[c] = bs * sn[c];
  for (int64_t j = 0; j < J; ++j) {
    const acc_t a = w[j] * rows[j].alpha * scale;
    const acc_t* tj = t + (j * N + n) * C;
    for (int64_t c = 0; c < C; ++c) gn[c] -= a * tj[c];
  }
}

bool pooled_cosine_forward_f32(const at::Tensor& student, at::TensorList targets, at::ArrayRef<double> weights,
                               double eps, at::Tensor& ps, at::Tensor& pt, at::Tensor& loss, at::Tensor& coef) {
  const int64_t J = targets.size();
  PoolLayout layouts[kMaxTargets + 1];
  if (ps.scalar_type() != at::kFloat || !fast_layout(student, &layouts[0])) return false;
  for (int64_t j = 0; j < J; ++j)
    if (!fast_layout(targets[j], &layouts[j + 1])) return false;
  const int64_t N = student.size(0), C = student.size(1), HW = student.size(2) * student.size(3);
  const float* src[kMaxTargets + 1];
  int64_t hw[kMaxTargets + 1];
  src[0] = student.data_ptr<float>();
  hw[0] = HW;
  int64_t work = C * HW;
  for (int64_t j = 0; j < J; ++j) {
    src[j + 1] = targets[j].data_ptr<float>();
    hw[j + 1] = targets[j].dim() == 2 ? 1 : targets[j].size(2) * targets[j].size(3);
    work += C * hw[j + 1];
  }
  float* s = ps.data_ptr<float>();
  float* t = pt.data_ptr<float>();
  float* g = coef.data_ptr<float>();
  float w[kMaxTargets];
  for (int64_t j = 0; j < J; ++j) w[j] = static_cast<float>(weights[j]);
  const float scale = 1.f / (static_cast<float>(N) * static_cast<float>(HW));
  std::vector<float> per_row(N);
  at::parallel_for(0, N, grain_for(work), [&](int64_t b, int64_t e) {
    CosineRow<float> rows[kMaxTargets];
    for (int64_t n = b; n < e; ++n) {
      pool_row(src[0], layouts[0], n, C, hw[0], s + n * C);
      for (int64_t j = 0; j < J; ++j) pool_row(src[j + 1], layouts[j + 1], n, C, hw[j + 1], t + (j * N + n) * C);
      cosine_rows<float>(s, t, J, N, C, n, static_cast<float>(eps), rows);
      float l = 0.f;
      for (int64_t j = 0; j < J; ++j) l += w[j] * (1.f - rows[j].cos);
      per_row[n] = l;
      coef_row<float>(s, t, rows, w, J, N, C, n, scale, g);
    }
  });
  float total = 0.f;
  for (int64_t n = 0; n < N; ++n) total += per_row[n];
  loss.fill_(total / static_cast<float>(N));
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_cosine_loss_cpu(const at::Tensor& student,
                                                                      at::TensorList targets,
                                                                      at::ArrayRef<double> weights, double eps) {
  check_pooled_cosine_args(student, targets, weights);
  const auto acc_type = at::toOpMathType(student.scalar_type());
  const int64_t N = student.size(0), C = student.size(1), J = targets.size();
  auto ps = at::empty({N, C}, student.options().dtype(acc_type));
  auto pt = at::empty({J, N, C}, student.options().dtype(acc_type));
  auto loss = at::empty({}, ps.options());
  auto coef = at::empty({N, C}, ps.options());
  if (pooled_cosine_forward_f32(student, targets, weights, eps, ps, pt, loss, coef)) return {loss, ps, pt, coef};
  pool_cpu_into(student, ps);
  for (int64_t j = 0; j < J; ++j) {
    auto slot = pt.select(0, j);
    pool_cpu_into(targets[j], slot);
  }
  const int64_t HW = student.size(2) * student.size(3);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "fa_cosine_cpu", [&] {
    const scalar_t* s = ps.data_ptr<scalar_t>();
    const scalar_t* t = pt.data_ptr<scalar_t>();
    scalar_t* g = coef.data_ptr<scalar_t>();
    scalar_t w[kMaxTargets];
    for (int64_t j = 0; j < J; ++j) w[j] = static_cast<scalar_t>(weights[j]);
    const scalar_t scale = scalar_t(1) / (static_cast<scalar_t>(N) * static_cast<scalar_t>(HW));
    std::vector<scalar_t> per_row(N);
    at::parallel_for(0, N, grain_for(C * (J + 1)), [&](int64_t b, int64_t e) {
      CosineRow<scalar_t> rows[kMaxTargets];
      for (int64_t n = b; n < e; ++n) {
        cosine_rows<scalar_t>(s, t, J, N, C, n, static_cast<scalar_t>(eps), rows);
        scalar_t l = 0;
        for (int64_t j = 0; j < J; ++j) l += w[j] * (scalar_t(1) - rows[j].cos);
        per_row[n] = l;
        coef_row<scalar_t>(s, t, rows, w, J, N, C, n, scale, g);
      }
    });
    scalar_t total = 0;
    for (int64_t n = 0; n < N; ++n) total += per_row[n];
    loss.fill_(total / static_cast<scalar_t>(N));
  });
  return {loss, ps, pt, coef};
}

#ifdef FA_AVX2
// 8 lanes at a time in float32 for float, half (F16C) and bfloat16 (bit shifts, round to nearest even): the
// compiler does not vectorise the scalar conversions of c10::Half / c10::BFloat16 by itself.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

struct Bounds8 {
  __m256 eps, lo, hi;
  Bounds8(float eps, float lo, float hi) : eps(_mm256_set1_ps(eps)), lo(_mm256_set1_ps(lo)), hi(_mm256_set1_ps(hi)) {}
};

// fa_math.h's project(); the operand order keeps the scalar semantics (a NaN in y stays NaN)
inline __m256 project8(__m256 y, __m256 c, const Bounds8& b) {
  y = _mm256_max_ps(_mm256_sub_ps(c, b.eps), y);
  y = _mm256_min_ps(_mm256_add_ps(c, b.eps), y);
  y = _mm256_max_ps(b.lo, y);
  return _mm256_min_ps(b.hi, y);
}

inline __m256 sign8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(g, zero, _CMP_GT_OQ), one),
                       _mm256_and_ps(_mm256_cmp_ps(g, zero, _CMP_LT_OQ), one));
}

template <typename scalar_t>
int64_t sign_step_avx2(scalar_t* po, const scalar_t* px, const scalar_t* pg, const scalar_t* pc, int64_t b,
                       int64_t e, float step, float eps, float lo, float hi) {
  const Bounds8 bounds(eps, lo, hi);
  const __m256 vstep = _mm256_set1_ps(step);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 x = load8(px + i), c = load8(pc + i);
    store8(po + i, project8(_mm256_add_ps(x, _mm256_mul_ps(vstep, sign8(load8(pg + i)))), c, bounds));
  }
  return i;
}

// a * z + b * (x + (x - x_prev)) with separate multiplies and adds, as fa_math.h writes it
template <typename scalar_t>
int64_t apgd_step_avx2(scalar_t* po, const scalar_t* px, const scalar_t* pp, const scalar_t* pg, const scalar_t* pc,
                       int64_t b, int64_t e, float step, float eps, float ma, float mb, float lo, float hi) {
  const Bounds8 bounds(eps, lo, hi);
  const __m256 vstep = _mm256_set1_ps(step), va = _mm256_set1_ps(ma), vb = _mm256_set1_ps(mb);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 x = load8(px + i), c = load8(pc + i);
    const __m256 z = project8(_mm256_add_ps(x, _mm256_mul_ps(vstep, sign8(load8(pg + i)))), c, bounds);
    const __m256 w = _mm256_add_ps(x, _mm256_sub_ps(x, load8(pp + i)));
    store8(po + i, project8(_mm256_add_ps(_mm256_mul_ps(va, z), _mm256_mul_ps(vb, w)), c, bounds));
  }
  return i;
}
#endif

void sign_step_flat_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& xc,
                        double step, double eps, double lo, double hi) {
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_sign_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pc = xc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const acc_t st = step, ep = eps, l = lo, h = hi;
    at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
      int64_t i = b;
#ifdef FA_AVX2
      if constexpr (!std::is_same_v<scalar_t, double> && !std::is_same_v<scalar_t, float>)
        i = sign_step_avx2<scalar_t>(po, px, pg, pc, b, e, st, ep, l, h);
#endif
      for (; i < e; ++i) po[i] = static_cast<scalar_t>(sign_step_value<acc_t>(px[i], pg[i], pc[i], st, ep, l, h));
    });
  });
}

void apgd_step_flat_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                        const at::Tensor& xc, double step, double eps, double momentum, double lo, double hi) {
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_apgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pp = x_prev.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pc = xc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    // b = 1 - a in double, then rounded: the value reference.py's (1 - momentum) has
    const acc_t st = step, ep = eps, ma = momentum, mb = 1.0 - momentum, l = lo, h = hi;
    at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
      int64_t i = b;
#ifdef FA_AVX2
      // float too: GCC leaves this loop of five streams scalar (measured 6x slower than these 8 lanes)
      if constexpr (!std::is_same_v<scalar_t, double>)
        i = apgd_step_avx2<scalar_t>(po, px, pp, pg, pc, b, e, st, ep, ma, mb, l, h);
#endif
      for (; i < e; ++i)
        po[i] = static_cast<scalar_t>(apgd_step_value<acc_t>(px[i], pp[i], pg[i], pc[i], st, ep, ma, mb, l, h));
    });
  });
}

void sign_step_inplace_cpu(at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step, double eps,
                           double lo, double hi) {
  check_sign_step_args(x, grad, x_clean);
  elementwise_inplace([&](const at::Tensor& out, const at::Tensor& xs, const at::Tensor& g,
                          const at::Tensor& c) { sign_step_flat_cpu(out, xs, g, c, step, eps, lo, hi); },
                      x, grad, x_clean);
}

at::Tensor sign_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step,
                         double eps, double lo, double hi) {
  check_sign_step_args(x, grad, x_clean);
  return elementwise_out_of_place([&](const at::Tensor& out, const at::Tensor& xs, const at::Tensor& g,
                                      const at::Tensor& c) { sign_step_flat_cpu(out, xs, g, c, step, eps, lo, hi); },
                                  x, grad, x_clean);
}

at::Tensor apgd_step_cpu(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                         const at::Tensor& x_clean, double step, double eps, double momentum, double lo, double hi) {
  check_apgd_step_args(x, x_prev, grad, x_clean, momentum);
  return elementwise_out_of_place(
      [&](const at::Tensor& out, const at::Tensor& xs, const at::Tensor& xp, const at::Tensor& g, const at::Tensor& c) {
        apgd_step_flat_cpu(out, xs, xp, g, c, step, eps, momentum, lo, hi);
      },
      x, x_prev, grad, x_clean);
}

}  // namespace

}  // namespace fa

TORCH_LIBRARY_IMPL(fa_kernels, CPU, m) {
  m.impl("pooled_cosine_loss", &fa::pooled_cosine_loss_cpu);
  m.impl("sign_step_", &fa::sign_step_inplace_cpu);
  m.impl("sign_step", &fa::sign_step_cpu);
  m.impl("apgd_step", &fa::apgd_step_cpu);
}
