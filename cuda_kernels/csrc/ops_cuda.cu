// CUDA kernels of the fused ops.
//
// - Elementwise steps (sign step, APGD step): 16-byte vector accesses when every pointer is 16-byte aligned, a grid
//   sized for the elements each thread handles, grid-stride loops. The in-place sign step passes out == x (and the
//   gradient may be x too), so no pointer of these kernels is __restrict__.
// - Pooling over H, W into the student's accumulation type (targets of another floating dtype are converted, as on
//   the CPU): a group of 1-32 lanes per row for maps of up to kGroupMaxHW positions, several rows per block (a 4x4
//   map keeps every lane busy); a block per row for larger maps; a thread per (n, c) for channels_last.
// - Cosine terms, row losses and gradient coefficients: a warp per batch row, one kernel. The forward computes
//   d loss / d student for an upstream gradient of 1 and the backward (ops.py) scales it on the device: no host
//   synchronisation, no per-call constant tensors.
// 64-bit indexing; every grid is one-dimensional and bounded (grid_for), every launch is checked, and an empty
// batch launches nothing (its loss is the mean of no rows, NaN, as on the CPU).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "fa_math.h"
#include "fa_ops.h"

namespace fa {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Grid-stride loops cover any amount of work with at most this many blocks: far more than any GPU runs at once, far
// below gridDim.x's 2^31 - 1; gridDim.y and .z (65535 at most) are never used.
constexpr int64_t kMaxBlocks = 65535;
// pooling: maps of up to this many positions get a lane group per row, larger ones a block per row
constexpr int64_t kGroupMaxHW = 1024;

// Blocks for `items` work items (> 0) at `per_block` items per block: the int64 count is bounded before it becomes
// a launch argument, so it can never be narrowed to 32 bits.
unsigned int grid_for(int64_t items, int64_t per_block) {
  TORCH_INTERNAL_ASSERT(items > 0 && per_block > 0, "grid_for: ", items, " items, ", per_block, " per block");
  return static_cast<unsigned int>(std::min<int64_t>((items - 1) / per_block + 1, kMaxBlocks));
}

struct Weights {
  double w[kMaxTargets];
};

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / kWarp];
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / kWarp ? warp_sums[lane] : acc_t(0);
  if (warp == 0)
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  __syncthreads();  // warp_sums may be reused by the next call
  return v;         // valid in thread 0
}

// The sum over each aligned group of `width` lanes (a power of two <= 32), in every lane of the group. Every lane of
// the warp must call it.
template <int width, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
#pragma unroll
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o, width);
  return v;
}

// ---- elementwise steps -------------------------------------------------------------------------------------

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

template <typename scalar_t, int K>
struct Inputs {
  const scalar_t* p[K];
};

// out[i] = f(in_0[i], ..., in_{K-1}[i]) for i < n, VEC elements per thread and iteration. All of an iteration's
// loads come before its store, so out may be one of the inputs.
template <typename scalar_t, int VEC, int K, typename F>
__global__ void elementwise_kernel(scalar_t* out, Inputs<scalar_t, K> in, int64_t n, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = first; i < nvec; i += stride) {
    V v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = reinterpret_cast<const V*>(in.p[k])[i];
    V o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc_t a[K];
#pragma unroll
      for (int k = 0; k < K; ++k) a[k] = static_cast<acc_t>(v[k].v[e]);
      o.v[e] = static_cast<scalar_t>(f(a));
    }
    reinterpret_cast<V*>(out)[i] = o;
  }
  for (int64_t i = nvec * VEC + first; i < n; i += stride) {  // the last n % VEC elements
    acc_t a[K];
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = static_cast<acc_t>(in.p[k][i]);
    out[i] = static_cast<scalar_t>(f(a));
  }
}

template <typename acc_t>
struct SignStepF {  // inputs: x, grad, x_clean
  acc_t step, eps, lo, hi;
  __device__ acc_t operator()(const acc_t* v) const {
    return sign_step_value<acc_t>(v[0], v[1], v[2], step, eps, lo, hi);
  }
};

template <typename acc_t>
struct ApgdStepF {  // inputs: x, x_prev, grad, x_clean
  acc_t step, eps, a, b, lo, hi;
  __device__ acc_t operator()(const acc_t* v) const {
    return apgd_step_value<acc_t>(v[0], v[1], v[2], v[3], step, eps, a, b, lo, hi);
  }
};

template <typename scalar_t, int K, typename F>
void launch_elementwise(const at::Tensor& out, const at::Tensor* const (&in)[K], F f) {
  const int64_t n = out.numel();
  if (n == 0) return;
  constexpr int VEC = 16 / sizeof(scalar_t);
  Inputs<scalar_t, K> ptrs;
  bool aligned = reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  for (int k = 0; k < K; ++k) {
    ptrs.p[k] = in[k]->template data_ptr<scalar_t>();
    aligned = aligned && reinterpret_cast<uintptr_t>(ptrs.p[k]) % 16 == 0;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (aligned) {  // a thread per VEC elements
    elementwise_kernel<scalar_t, VEC, K, F><<<grid_for((n - 1) / VEC + 1, kThreads), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), ptrs, n, f);
  } else {
    elementwise_kernel<scalar_t, 1, K, F><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), ptrs, n, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sign_step_flat_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& xc,
                         double step, double eps, double lo, double hi) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_sign_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor* in[3] = {&x, &grad, &xc};
    launch_elementwise<scalar_t, 3>(out, in, SignStepF<acc_t>{static_cast<acc_t>(step), static_cast<acc_t>(eps),
                                                              static_cast<acc_t>(lo), static_cast<acc_t>(hi)});
  });
}

void apgd_step_flat_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& x_prev,
                         const at::Tensor& grad, const at::Tensor& xc, double step, double eps, double momentum,
                         double lo, double hi) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_apgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor* in[4] = {&x, &x_prev, &grad, &xc};
    // b = 1 - a in double, then rounded, as on the CPU
    launch_elementwise<scalar_t, 4>(
        out, in,
        ApgdStepF<acc_t>{static_cast<acc_t>(step), static_cast<acc_t>(eps), static_cast<acc_t>(momentum),
                         static_cast<acc_t>(1.0 - momentum), static_cast<acc_t>(lo), static_cast<acc_t>(hi)});
  });
}

void sign_step_inplace_cuda(at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step,
                            double eps, double lo, double hi) {
  check_sign_step_args(x, grad, x_clean);
  elementwise_inplace([&](const at::Tensor& out, const at::Tensor& xs, const at::Tensor& g,
                          const at::Tensor& c) { sign_step_flat_cuda(out, xs, g, c, step, eps, lo, hi); },
                      x, grad, x_clean);
}

at::Tensor sign_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_clean, double step,
                          double eps, double lo, double hi) {
  check_sign_step_args(x, grad, x_clean);
  return elementwise_out_of_place([&](const at::Tensor& out, const at::Tensor& xs, const at::Tensor& g,
                                      const at::Tensor& c) { sign_step_flat_cuda(out, xs, g, c, step, eps, lo, hi); },
                                  x, grad, x_clean);
}

at::Tensor apgd_step_cuda(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& grad,
                          const at::Tensor& x_clean, double step, double eps, double momentum, double lo, double hi) {
  check_apgd_step_args(x, x_prev, grad, x_clean, momentum);
  return elementwise_out_of_place(
      [&](const at::Tensor& out, const at::Tensor& xs, const at::Tensor& xp, const at::Tensor& g, const at::Tensor& c) {
        apgd_step_flat_cuda(out, xs, xp, g, c, step, eps, momentum, lo, hi);
      },
      x, x_prev, grad, x_clean);
}

// ---- pooling -----------------------------------------------------------------------------------------------

// accumulation type of a pooling: the output's when it is double (a float32 target of a float64 student), else the
// input's opmath type (a float64 target of a float32 student is summed in double and rounded once)
template <typename scalar_t, typename out_t>
using pool_acc_t = std::conditional_t<std::is_same_v<out_t, double>, double, at::opmath_type<scalar_t>>;

// rows of HW contiguous values, a group of GROUP lanes per row, kThreads / GROUP rows per block and iteration
template <typename scalar_t, typename out_t, int GROUP>
__global__ void pool_rows_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ out, int64_t rows,
                                 int64_t HW) {
  using acc_t = pool_acc_t<scalar_t, out_t>;
  constexpr int64_t kRowsPerBlock = kThreads / GROUP;
  const int lane = threadIdx.x % GROUP;
  // the loop is uniform across the block (it depends on blockIdx only), so every lane of a warp reaches the
  // shuffles, rows past the end included
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; base < rows;
       base += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.x / GROUP;
    acc_t s = 0;
    if (row < rows) {
      const scalar_t* p = x + row * HW;
      for (int64_t i = lane; i < HW; i += GROUP) s += static_cast<acc_t>(p[i]);
    }
    s = group_sum<GROUP>(s);
    if (row < rows && lane == 0) out[row] = static_cast<out_t>(s / static_cast<acc_t>(HW));
  }
}

// rows of HW contiguous values (large maps), a block per row
template <typename scalar_t, typename out_t>
__global__ void pool_block_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ out, int64_t rows,
                                  int64_t HW) {
  using acc_t = pool_acc_t<scalar_t, out_t>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // uniform across the block
    const scalar_t* p = x + row * HW;
    acc_t s = 0;
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) s += static_cast<acc_t>(p[i]);
    s = block_sum(s);
    if (threadIdx.x == 0) out[row] = static_cast<out_t>(s / static_cast<acc_t>(HW));
  }
}

// channels_last [N,H,W,C]: a thread per (n, c); consecutive threads read consecutive channels (coalesced)
template <typename scalar_t, typename out_t>
__global__ void pool_nhwc_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ out, int64_t N, int64_t C,
                                 int64_t HW) {
  using acc_t = pool_acc_t<scalar_t, out_t>;
  const int64_t total = N * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i - n * C;
    const scalar_t* p = x + n * HW * C + c;
    acc_t s = 0;
    for (int64_t k = 0; k < HW; ++k) s += static_cast<acc_t>(p[k * C]);
    out[i] = static_cast<out_t>(s / static_cast<acc_t>(HW));
  }
}

template <typename scalar_t, typename out_t>
void launch_pool(const scalar_t* x, out_t* out, bool nhwc, int64_t N, int64_t C, int64_t HW) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = N * C;
  if (nhwc) {
    pool_nhwc_kernel<scalar_t, out_t><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(x, out, N, C, HW);
  } else if (HW > kGroupMaxHW) {
    pool_block_kernel<scalar_t, out_t><<<grid_for(rows, 1), kThreads, 0, stream>>>(x, out, rows, HW);
  } else if (HW > 16) {
    pool_rows_kernel<scalar_t, out_t, 32><<<grid_for(rows, kThreads / 32), kThreads, 0, stream>>>(x, out, rows, HW);
  } else if (HW > 4) {
    pool_rows_kernel<scalar_t, out_t, 16><<<grid_for(rows, kThreads / 16), kThreads, 0, stream>>>(x, out, rows, HW);
  } else if (HW > 1) {
    pool_rows_kernel<scalar_t, out_t, 4><<<grid_for(rows, kThreads / 4), kThreads, 0, stream>>>(x, out, rows, HW);
  } else {
    pool_rows_kernel<scalar_t, out_t, 1><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(x, out, rows, HW);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Average pool over H, W of [N,C,H,W] (or a copy of an already pooled [N,C]) into the contiguous [N,C] `out` of the
// student's accumulation type (float or double), whatever the input's floating dtype.
void pool_cuda_into(const at::Tensor& x_in, const at::Tensor& out) {
  if (x_in.dim() == 2) {
    out.copy_(x_in);
    return;
  }
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  if (N * C == 0) return;
  const bool nhwc = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fa_pool_cuda", [&] {
    if (out.scalar_type() == at::kDouble) {
      launch_pool<scalar_t, double>(x.data_ptr<scalar_t>(), out.data_ptr<double>(), nhwc, N, C, HW);
    } else {
      launch_pool<scalar_t, float>(x.data_ptr<scalar_t>(), out.data_ptr<float>(), nhwc, N, C, HW);
    }
  });
}

// ---- cosine rows and gradient coefficients: a warp per batch row n ----------------------------------------
//
// row_loss[n] = sum_j w_j (1 - cos_j);  coef[n, c] = scale (sum_j w_j beta_j s[n,c] - sum_j w_j alpha_j t_j[n,c]),
// scale = 1 / (N H W): d loss / d student[n,c,h,w] for an upstream gradient of 1 (fa_math.h: alpha, beta)
template <typename acc_t>
__global__ void cosine_rows_kernel(const acc_t* __restrict__ s, const acc_t* __restrict__ t, int64_t J, int64_t N,
                                   int64_t C, acc_t eps, acc_t scale, Weights w, acc_t* __restrict__ row_loss,
                                   acc_t* __restrict__ coef) {
  constexpr int64_t kRowsPerBlock = kThreads / kWarp;
  const int lane = threadIdx.x % kWarp;
  // one row per warp and iteration: the loop is uniform across each warp
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; n < N;
       n += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const acc_t* sn = s + n * C;
    acc_t ss = 0;
    for (int64_t c = lane; c < C; c += kWarp) ss += sn[c] * sn[c];
    ss = group_sum<kWarp>(ss);
    acc_t loss = 0, bsum = 0;
    acc_t wa[kMaxTargets];
    for (int64_t j = 0; j < J; ++j) {
      const acc_t* tj = t + (j * N + n) * C;
      acc_t dot = 0, tt = 0;
      for (int64_t c = lane; c < C; c += kWarp) {
        dot += sn[c] * tj[c];
        tt += tj[c] * tj[c];
      }
      dot = group_sum<kWarp>(dot);
      tt = group_sum<kWarp>(tt);
      const auto r = cosine_row<acc_t>(dot, ss, tt, eps);
      const acc_t wj = static_cast<acc_t>(w.w[j]);
      loss += wj * (acc_t(1) - r.cos);
      bsum += wj * r.beta;
      wa[j] = wj * r.alpha * scale;
    }
    if (lane == 0) row_loss[n] = loss;
    const acc_t bs = bsum * scale;
    for (int64_t c = lane; c < C; c += kWarp) {
      acc_t v = bs * sn[c];
      for (int64_t j = 0; j < J; ++j) v -= wa[j] * t[(j * N + n) * C + c];
      coef[n * C + c] = v;
    }
  }
}

Weights pack(at::ArrayRef<double> weights) {
  Weights w{};
  for (size_t j = 0; j < weights.size() && j < static_cast<size_t>(kMaxTargets); ++j) w.w[j] = weights[j];
  return w;
}

template <typename acc_t>
void launch_cosine_rows(const at::Tensor& ps, const at::Tensor& pt, at::ArrayRef<double> weights, double eps,
                        int64_t HW, const at::Tensor& row_loss, const at::Tensor& coef) {
  const int64_t J = pt.size(0), N = ps.size(0), C = ps.size(1);
  const acc_t scale = acc_t(1) / (static_cast<acc_t>(N) * static_cast<acc_t>(HW));
  auto stream = c10::cuda::getCurrentCUDAStream();
  cosine_rows_kernel<acc_t><<<grid_for(N, kThreads / kWarp), kThreads, 0, stream>>>(
      ps.data_ptr<acc_t>(), pt.data_ptr<acc_t>(), J, N, C, static_cast<acc_t>(eps), scale, pack(weights),
      row_loss.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pooled_cosine_loss_cuda(const at::Tensor& student,
                                                                                   at::TensorList targets,
                                                                                   at::ArrayRef<double> weights,
                                                                                   double eps) {
  check_pooled_cosine_args(student, targets, weights);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(at::toOpMathType(student.scalar_type()));
  const int64_t N = student.size(0), C = student.size(1), J = targets.size();
  const int64_t HW = student.size(2) * student.size(3);
  auto ps = at::empty({N, C}, opts);
  auto pt = at::empty({J, N, C}, opts);
  pool_cuda_into(student, ps);
  for (int64_t j = 0; j < J; ++j) pool_cuda_into(targets[j], pt.select(0, j));
  auto row_loss = at::empty({N}, opts);
  auto coef = at::empty({N, C}, opts);
  if (N > 0) {
    if (ps.scalar_type() == at::kDouble) {
      launch_cosine_rows<double>(ps, pt, weights, eps, HW, row_loss, coef);
    } else {
      launch_cosine_rows<float>(ps, pt, weights, eps, HW, row_loss, coef);
    }
  }
  return {row_loss.mean(), ps, pt, coef};
}

}  // namespace
}  // namespace fa

TORCH_LIBRARY_IMPL(fa_kernels, CUDA, m) {
  m.impl("pooled_cosine_loss", &fa::pooled_cosine_loss_cuda);
  m.impl("sign_step_", &fa::sign_step_inplace_cuda);
  m.impl("sign_step", &fa::sign_step_cuda);
  m.impl("apgd_step", &fa::apgd_step_cuda);
}
