// CUDA kernels of the fused ops: vectorised sign-step, block-reduction pooling, per-row cosine terms and the
// gradient coefficients. 64-bit indexing throughout; every launch is checked. No host synchronisation: the
// upstream gradient is read on the device.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "fa_math.h"
#include "fa_ops.h"

namespace fa {
namespace {

constexpr int kThreads = 256;

struct Weights {
  double w[kMaxTargets];
};

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[lane] : acc_t(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  __syncthreads();  // warp_sums may be reused by the next call
  return v;         // valid in thread 0
}

// ---- sign step ---------------------------------------------------------------------------------------------

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__global__ void sign_step_kernel(scalar_t* __restrict__ out, const scalar_t* x, const scalar_t* __restrict__ g,
                                 const scalar_t* c, int64_t n, at::opmath_type<scalar_t> step,
                                 at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> lo,
                                 at::opmath_type<scalar_t> hi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const auto xv = reinterpret_cast<const Vec<scalar_t, VEC>*>(x)[i];
    const auto gv = reinterpret_cast<const Vec<scalar_t, VEC>*>(g)[i];
    const auto cv = reinterpret_cast<const Vec<scalar_t, VEC>*>(c)[i];
    Vec<scalar_t, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      ov.v[k] = static_cast<scalar_t>(sign_step_value<acc_t>(xv.v[k], gv.v[k], cv.v[k], step, eps, lo, hi));
    reinterpret_cast<Vec<scalar_t, VEC>*>(out)[i] = ov;
  }
  for (int64_t i = nvec * VEC + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = static_cast<scalar_t>(sign_step_value<acc_t>(x[i], g[i], c[i], step, eps, lo, hi));
}

void sign_step_flat_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& xc,
                         double step, double eps, double lo, double hi) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_sign_step_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
    const int64_t blocks = std::min<int64_t>((n + kThreads * 4 - 1) / (kThreads * 4), 65535);
    if (aligned(out) && aligned(x) && aligned(grad) && aligned(xc)) {
      sign_step_kernel<scalar_t, VEC><<<blocks, kThreads, 0, stream>>>(
          out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), n,
          step, eps, lo, hi);
    } else {
      sign_step_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
          out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), n,
          step, eps, lo, hi);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sign_step_inplace_cuda(at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step, double eps,
                          double lo, double hi) {
  sign_step_inplace(sign_step_flat_cuda, x, grad, x_clean, step, eps, lo, hi);
}

at::Tensor sign_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step,
                         double eps, double lo, double hi) {
  return sign_step_out_of_place(sign_step_flat_cuda, x, grad, x_clean, step, eps, lo, hi);
}

// ---- pooling -----------------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void pool_nchw_kernel(const scalar_t* __restrict__ x, at::opmath_type<scalar_t>* __restrict__ out,
                                 int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* p = x + row * HW;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) s += static_cast<acc_t>(p[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) out[row] = s / static_cast<acc_t>(HW);
}

template <typename scalar_t>
__global__ void pool_nhwc_kernel(const scalar_t* __restrict__ x, at::opmath_type<scalar_t>* __restrict__ out,
                                 int64_t C, int64_t HW) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const scalar_t* p = x + n * HW * C + c;
  acc_t s = 0;
  for (int64_t i = 0; i < HW; ++i) s += static_cast<acc_t>(p[i * C]);  // coalesced across c
  out[n * C + c] = s / static_cast<acc_t>(HW);
}

at::Tensor pool_cuda(const at::Tensor& x_in, at::ScalarType acc_type) {
  if (x_in.dim() == 2) return x_in.to(acc_type).contiguous();
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  auto out = at::empty({N, C}, x_in.options().dtype(acc_type));
  if (N * C == 0) return out;
  const bool nhwc = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!nhwc) {
      pool_nchw_kernel<scalar_t><<<N * C, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), HW);
    } else {
      dim3 grid((C + kThreads - 1) / kThreads, N);
      pool_nhwc_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), C, HW);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- cosine rows: one block per sample n; writes the per-row loss and the alpha/beta coefficients ---------

template <typename acc_t>
__global__ void cosine_rows_kernel(const acc_t* __restrict__ s, const acc_t* __restrict__ t, int64_t J, int64_t N,
                                   int64_t C, acc_t eps, Weights w, acc_t* __restrict__ row_loss,
                                   acc_t* __restrict__ alpha, acc_t* __restrict__ beta) {
  const int64_t n = blockIdx.x;
  acc_t ss = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) ss += s[n * C + c] * s[n * C + c];
  ss = block_sum(ss);
  __shared__ acc_t ss_shared;
  if (threadIdx.x == 0) ss_shared = ss;
  __syncthreads();
  acc_t loss = 0;
  for (int64_t j = 0; j < J; ++j) {
    const acc_t* tj = t + (j * N + n) * C;
    acc_t dot = 0, tt = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      dot += s[n * C + c] * tj[c];
      tt += tj[c] * tj[c];
    }
    dot = block_sum(dot);
    tt = block_sum(tt);
    if (threadIdx.x == 0) {
      const auto r = cosine_row<acc_t>(dot, ss_shared, tt, eps);
      loss += static_cast<acc_t>(w.w[j]) * (acc_t(1) - r.cos);
      alpha[j * N + n] = r.alpha;
      beta[j * N + n] = r.beta;
    }
  }
  if (threadIdx.x == 0) row_loss[n] = loss;
}

template <typename acc_t>
__global__ void grad_coef_kernel(acc_t* __restrict__ out, const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                                 const acc_t* __restrict__ alpha, const acc_t* __restrict__ beta,
                                 const acc_t* __restrict__ grad, Weights w, int64_t J, int64_t N, int64_t C,
                                 int64_t HW) {
  const int64_t total = N * C;
  const acc_t scale = grad[0] / (static_cast<acc_t>(N) * static_cast<acc_t>(HW));
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / C;
    acc_t v = 0;
    for (int64_t j = 0; j < J; ++j)
      v += static_cast<acc_t>(w.w[j]) * (beta[j * N + n] * s[i] - alpha[j * N + n] * t[j * N * C + i]);
    out[i] = v * scale;
  }
}

Weights pack(at::ArrayRef<double> weights) {
  Weights w{};
  for (size_t j = 0; j < weights.size() && j < static_cast<size_t>(kMaxTargets); ++j) w.w[j] = weights[j];
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_cosine_loss_cuda(const at::Tensor& student,
                                                                       at::TensorList targets,
                                                                       at::ArrayRef<double> weights, double eps) {
  check_pooled_cosine_args(student, targets, weights);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_type = at::toOpMathType(student.scalar_type());
  auto ps = pool_cuda(student, acc_type);
  std::vector<at::Tensor> pooled;
  for (const auto& t : targets) pooled.push_back(pool_cuda(t, acc_type));
  auto pt = at::stack(pooled).contiguous();
  const int64_t N = student.size(0), C = student.size(1), J = targets.size();
  auto row_loss = at::empty({N}, ps.options());
  auto alpha = at::empty({J, N}, ps.options());
  auto beta = at::empty({J, N}, ps.options());
  // d loss / d student per H,W position for an upstream gradient of 1: [N,C], computed here from alpha / beta so
  // that the backward is a scale and a broadcast view
  auto coef = at::empty({N, C}, ps.options());
  auto one = at::ones({1}, ps.options());
  const int64_t HW = student.size(2) * student.size(3);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((N * C + kThreads - 1) / kThreads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "fa_cosine_cuda", [&] {
    cosine_rows_kernel<scalar_t><<<N, kThreads, 0, stream>>>(
        ps.data_ptr<scalar_t>(), pt.data_ptr<scalar_t>(), J, N, C, static_cast<scalar_t>(eps), pack(weights),
        row_loss.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (N * C > 0) {
      grad_coef_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          coef.data_ptr<scalar_t>(), ps.data_ptr<scalar_t>(), pt.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
          beta.data_ptr<scalar_t>(), one.data_ptr<scalar_t>(), pack(weights), J, N, C, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {row_loss.mean(), ps, pt, coef};
}

}  // namespace
}  // namespace fa

TORCH_LIBRARY_IMPL(fa_kernels, CUDA, m) {
  m.impl("pooled_cosine_loss", &fa::pooled_cosine_loss_cuda);
  m.impl("sign_step_", &fa::sign_step_inplace_cuda);
  m.impl("sign_step", &fa::sign_step_cuda);
}
