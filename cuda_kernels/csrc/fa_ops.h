// Declarations shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) translation units.
#pragma once

#include <ATen/ATen.h>

namespace fa {

constexpr int64_t kMaxTargets = 8;  // alignment targets per call (KDFA + SSFA use 2)

void check_pooled_cosine_args(const at::Tensor& student, at::TensorList targets, at::ArrayRef<double> weights);
void check_sign_step_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean);
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c);

}  // namespace fa
