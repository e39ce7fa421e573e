// Declarations shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) translation units; the argument checks and the
// op schemas are defined once, in fa_ops.cpp, for both devices.
#pragma once

#include <ATen/ATen.h>

namespace fa {

constexpr int64_t kMaxTargets = 8;  // alignment targets per call (KDFA + SSFA use 2)

// Targets may have another floating dtype than the student (a float64 teacher map beside a float32 student, say):
// every device pools them into the student's accumulation type, as reference.py does.
void check_pooled_cosine_args(const at::Tensor& student, at::TensorList targets, at::ArrayRef<double> weights);
void check_sign_step_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean);
void check_apgd_step_args(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                          const at::Tensor& x_clean, double momentum);

// True when the tensors can be walked as one flat array in storage order (contiguous, channels_last, ...).
template <typename... Rest>
bool same_dense_layout(const at::Tensor& a, const Rest&... rest) {
  return a.is_non_overlapping_and_dense() && ((a.strides() == rest.strides()) && ...);
}

// The layout handling of the elementwise ops around a device's flat kernel `flat(out, x, inputs...)`, which walks
// dense tensors of one layout as flat arrays (out may be x).
//
// In place: x keeps its layout; mixed layouts go through contiguous copies and back into x.
template <typename Flat, typename... Rest>
void elementwise_inplace(Flat flat, at::Tensor& x, const Rest&... rest) {
  if (same_dense_layout(x, rest...)) {
    flat(x, x, rest...);
    return;
  }
  auto xc = x.contiguous();
  flat(xc, xc, rest.contiguous()...);  // the copies of rest are taken before the pass writes into xc
  if (!xc.is_same(x)) x.copy_(xc);
}

// Out of place: the result has x's layout (at::empty_like(x), which is what the fake kernels return).
template <typename Flat, typename... Rest>
at::Tensor elementwise_out_of_place(Flat flat, const at::Tensor& x, const Rest&... rest) {
  auto out = at::empty_like(x);
  if (same_dense_layout(out, x, rest...)) {
    flat(out, x, rest...);
    return out;
  }
  // mixed layouts: one pass over contiguous copies, into out directly when out is contiguous
  auto res = out.is_contiguous() ? out : at::empty_like(x, at::MemoryFormat::Contiguous);
  flat(res, x.contiguous(), rest.contiguous()...);
  if (!res.is_same(out)) out.copy_(res);
  return out;
}

}  // namespace fa
