// Declarations shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) translation units.
#pragma once

#include <ATen/ATen.h>

namespace fa {

constexpr int64_t kMaxTargets = 8;  // alignment targets per call (KDFA + SSFA use 2)

void check_pooled_cosine_args(const at::Tensor& student, at::TensorList targets, at::ArrayRef<double> weights);
void check_sign_step_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean);
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);

// The layout handling of sign_step_ / sign_step around a device's flat kernel
// `flat(out, x, grad, x_clean, step, eps, lo, hi)` that walks dense tensors of one layout as flat arrays.
template <typename Flat>
void sign_step_inplace(Flat flat, at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step,
                       double eps, double lo, double hi) {
  check_sign_step_args(x, grad, x_clean);
  if (same_dense_layout(x, grad, x_clean)) {
    flat(x, x, grad, x_clean, step, eps, lo, hi);
    return;
  }
  // mixed layouts: one pass over contiguous copies, then back into x's own layout
  auto xc = x.contiguous();
  flat(xc, xc, grad.contiguous(), x_clean.contiguous(), step, eps, lo, hi);
  if (!xc.is_same(x)) x.copy_(xc);
}

template <typename Flat>
at::Tensor sign_step_out_of_place(Flat flat, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean,
                                  double step, double eps, double lo, double hi) {
  check_sign_step_args(x, grad, x_clean);
  if (same_dense_layout(x, grad, x_clean)) {
    auto out = at::empty_like(x);
    flat(out, x, grad, x_clean, step, eps, lo, hi);
    return out;
  }
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  flat(out, xc, grad.contiguous(), x_clean.contiguous(), step, eps, lo, hi);
  return out;
}

}  // namespace fa
