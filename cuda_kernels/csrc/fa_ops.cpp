// The op schemas (declared once) and the argument checks both devices share. Kept apart from the CPU kernels so
// that a build of the CUDA kernels alone (the tests' CUDA emulator) has the same schemas and checks.
//
//   fa_kernels::pooled_cosine_loss(student, targets, weights, eps) -> (loss, pooled_student, pooled_targets, coef)
//       loss = mean_n sum_j w_j (1 - cos(avgpool_hw(student[n]), pool(target_j[n])))
//       coef = d loss / d student[n,c,h,w] (the same for every h, w): [N,C]; the backward scales and broadcasts it
//   fa_kernels::sign_step_(x!, grad, x_clean, step, eps, lo, hi)   x <- clamp(clamp(x + step sign(g), c +- eps), lo, hi)
//   fa_kernels::sign_step(x, grad, x_clean, step, eps, lo, hi) -> y
//   fa_kernels::apgd_step(x, x_prev, grad, x_clean, step, eps, momentum, lo, hi) -> y   (fa_math.h: apgd_step_value)
#include <torch/library.h>

#include "fa_ops.h"

namespace fa {

void check_pooled_cosine_args(const at::Tensor& student, at::TensorList targets, at::ArrayRef<double> weights) {
  TORCH_CHECK(student.dim() == 4, "pooled_cosine_loss: student must be [N,C,H,W], got ", student.sizes());
  TORCH_CHECK(targets.size() >= 1 && targets.size() <= kMaxTargets,
              "pooled_cosine_loss: between 1 and ", kMaxTargets, " targets are supported, got ", targets.size());
  TORCH_CHECK(targets.size() == weights.size(), "pooled_cosine_loss: ", targets.size(), " targets but ",
              weights.size(), " weights");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "pooled_cosine_loss: student must be floating point, got ",
              student.scalar_type());
  for (size_t j = 0; j < targets.size(); ++j) {
    const auto& t = targets[j];
    TORCH_CHECK(t.dim() == 2 || t.dim() == 4, "pooled_cosine_loss: target ", j,
                " must be [N,C] (pooled) or [N,C,H,W], got ", t.sizes());
    TORCH_CHECK(t.size(0) == student.size(0) && t.size(1) == student.size(1), "pooled_cosine_loss: target ", j,
                " has N,C = ", t.size(0), ",", t.size(1), " but the student has ", student.size(0), ",",
                student.size(1));
    TORCH_CHECK(t.device() == student.device(), "pooled_cosine_loss: target ", j, " is on ", t.device(),
                ", the student on ", student.device());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pooled_cosine_loss: target ", j, " must be floating point");
  }
}

void check_sign_step_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean) {
  TORCH_CHECK(x.sizes() == grad.sizes() && x.sizes() == x_clean.sizes(), "sign_step: x ", x.sizes(), ", grad ",
              grad.sizes(), " and x_clean ", x_clean.sizes(), " must have the same shape");
  TORCH_CHECK(x.scalar_type() == grad.scalar_type() && x.scalar_type() == x_clean.scalar_type(),
              "sign_step: x, grad and x_clean must have one dtype, got ", x.scalar_type(), ", ", grad.scalar_type(),
              ", ", x_clean.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sign_step: floating point tensors expected, got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == grad.device() && x.device() == x_clean.device(),
              "sign_step: x, grad and x_clean must be on one device");
}

void check_apgd_step_args(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                          const at::Tensor& x_clean, double momentum) {
  TORCH_CHECK(x.sizes() == x_prev.sizes() && x.sizes() == grad.sizes() && x.sizes() == x_clean.sizes(),
              "apgd_step: x ", x.sizes(), ", x_prev ", x_prev.sizes(), ", grad ", grad.sizes(), " and x_clean ",
              x_clean.sizes(), " must have the same shape");
  TORCH_CHECK(x.scalar_type() == x_prev.scalar_type() && x.scalar_type() == grad.scalar_type() &&
                  x.scalar_type() == x_clean.scalar_type(),
              "apgd_step: x, x_prev, grad and x_clean must have one dtype, got ", x.scalar_type(), ", ",
              x_prev.scalar_type(), ", ", grad.scalar_type(), ", ", x_clean.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "apgd_step: floating point tensors expected, got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == x_prev.device() && x.device() == grad.device() && x.device() == x_clean.device(),
              "apgd_step: x, x_prev, grad and x_clean must be on one device");
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "apgd_step: momentum must be in [0, 1], got ", momentum);
}

}  // namespace fa

TORCH_LIBRARY(fa_kernels, m) {
  // outputs: loss, pooled student [N,C], pooled targets [J,N,C], d loss / d student per H,W position [N,C]
  m.def("pooled_cosine_loss(Tensor student, Tensor[] targets, float[] weights, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("sign_step_(Tensor(a!) x, Tensor grad, Tensor x_clean, float step, float eps, float lo, float hi) -> ()");
  m.def("sign_step(Tensor x, Tensor grad, Tensor x_clean, float step, float eps, float lo, float hi) -> Tensor");
  m.def("apgd_step(Tensor x, Tensor x_prev, Tensor grad, Tensor x_clean, float step, float eps, float momentum, "
        "float lo, float hi) -> Tensor");
}
