// The per-element and per-row math of the fused ops, shared by the CPU (C++) and CUDA kernels.
//
// projection:  P(v) = clamp(clamp(v, c - eps, c + eps), lo, hi)   (a NaN stays NaN)
// sign step:   y = P(x + step * sign(g))   (sign(0) = 0)
// APGD step:   z = P(x + step * sign(g)); y = P(a z + b (x + (x - x_prev))) with b = 1 - a computed in double by
//              the caller: x + a (z - x) + (1 - a)(x - x_prev) of Croce & Hein (2020), arranged so that a = 1
//              gives z exactly (b = 0) and x_prev = x gives no momentum term.
// cosine term: cos(s, t) = <s, t> / (max(|s|, EPS) * max(|t|, EPS)); a zero vector gives cos = 0 and a
//              finite gradient, never NaN or inf. d(1 - cos)/ds = -alpha * t + beta * s with
//              alpha = 1 / (max(|s|,EPS) max(|t|,EPS)), beta = [|s| > EPS] <s,t> / (|s|^3 max(|t|,EPS)).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fa {

template <typename acc_t>
FA_HD acc_t sign_of(acc_t g) {
  return static_cast<acc_t>((g > acc_t(0)) - (g < acc_t(0)));
}

template <typename acc_t>
FA_HD acc_t project(acc_t y, acc_t c, acc_t eps, acc_t lo, acc_t hi) {
  const acc_t a = c - eps, b = c + eps;
  y = y < a ? a : y;
  y = y > b ? b : y;
  y = y < lo ? lo : y;
  y = y > hi ? hi : y;
  return y;
}

template <typename acc_t>
FA_HD acc_t sign_step_value(acc_t x, acc_t g, acc_t c, acc_t step, acc_t eps, acc_t lo, acc_t hi) {
  return project<acc_t>(x + step * sign_of(g), c, eps, lo, hi);
}

template <typename acc_t>
FA_HD acc_t apgd_step_value(acc_t x, acc_t x_prev, acc_t g, acc_t c, acc_t step, acc_t eps, acc_t a, acc_t b,
                            acc_t lo, acc_t hi) {
  const acc_t z = sign_step_value<acc_t>(x, g, c, step, eps, lo, hi);
  return project<acc_t>(a * z + b * (x + (x - x_prev)), c, eps, lo, hi);
}

template <typename acc_t>
struct CosineRow {
  acc_t cos;    // cosine similarity with the epsilon-guarded norms
  acc_t alpha;  // coefficient of t in -d cos/ds
  acc_t beta;   // coefficient of s in  d(1-cos)/ds
};

template <typename acc_t>
FA_HD CosineRow<acc_t> cosine_row(acc_t dot, acc_t ss, acc_t tt, acc_t eps) {
  const acc_t ns = sqrt(ss), nt = sqrt(tt);
  const acc_t ns_e = ns > eps ? ns : eps, nt_e = nt > eps ? nt : eps;
  CosineRow<acc_t> r;
  r.alpha = acc_t(1) / (ns_e * nt_e);
  r.cos = dot * r.alpha;
  r.beta = ns > eps ? dot / (ns * ns * ns * nt_e) : acc_t(0);
  return r;
}

}  // namespace fa
