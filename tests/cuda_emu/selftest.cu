// Kernels that each break one rule, and kernels that follow them all: the emulator must stop every broken one with a
// message naming the rule (tests/test_cuda_emulated.py matches it), and run the correct ones exactly (their results
// are checked here against CUDA's documented semantics). Compiled like ops_cuda.cu: the launches are rewritten at
// build time and include/cuda_emu.h is force-included.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr int kBlock = 64;  // two warps
constexpr int kOut = 16;    // results per thread

// Every warp primitive, with full and partial masks and sub-warp widths, and the counting barriers; out[t * kOut + k]
// is result k of thread t.
__global__ void warp_ops_kernel(int* out) {
  __shared__ int per_warp[kBlock / 32];
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * kOut;
  o[0] = __shfl_down_sync(0xffffffff, t, 3);
  o[1] = __shfl_up_sync(0xffffffff, t, 2, 8);
  o[2] = __shfl_xor_sync(0xffffffff, t, 5, 16);
  o[3] = __shfl_sync(0xffffffff, t, (lane * 7) % 32);
  o[4] = __shfl_sync(0xffffffff, t, 20, 16);
  o[5] = static_cast<int>(__ballot_sync(0xffffffff, lane % 3 == 0));
  o[6] = __any_sync(0xffffffff, t == 40);
  o[7] = __all_sync(0xffffffff, t < 40);
  // the two halves of a warp, each with a mask of its own: legal, and they must not meet
  if (lane < 16) {
    __syncwarp(0x0000ffff);
    o[8] = __shfl_xor_sync(0x0000ffff, t, 1);
  } else {
    __syncwarp(0xffff0000);
    o[8] = __shfl_xor_sync(0xffff0000, t, 2);
  }
  o[9] = __syncthreads_count(t % 5 == 0);
  o[10] = __syncthreads_and(t < 64);
  o[11] = __syncthreads_or(t == 63);
  // a block reduction through shared memory
  int v = t;
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffff, v, d);
  if (lane == 0) per_warp[t / 32] = v;
  __syncthreads();
  o[12] = per_warp[0] + per_warp[1];
  __syncthreads();
  o[13] = static_cast<int>(blockIdx.x * 100 + blockIdx.y * 10 + blockIdx.z);
  o[14] = static_cast<int>(gridDim.x * 100 + gridDim.y * 10 + gridDim.z);
  o[15] = static_cast<int>(blockDim.x * 100 + blockDim.y * 10 + blockDim.z);
}

// every (block, thread) of a 3-D grid of 2-D blocks counts itself once
__global__ void grid_kernel(int* hits) {
  const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned i = threadIdx.y * blockDim.x + threadIdx.x;
  hits[b * blockDim.x * blockDim.y + i] += 1;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit_kernel(int* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_warp_shuffle_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffff, v, 1);
  out[threadIdx.x] = v;
}

__global__ void lane_not_in_mask_kernel(int* out) {  // each lane names only its right neighbour
  out[threadIdx.x] = __shfl_sync(1u << ((threadIdx.x + 1) % 32), static_cast<int>(threadIdx.x), 0);
}

__global__ void full_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffff, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_reads_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffff, static_cast<int>(threadIdx.x), 1);
}

__global__ void mismatched_masks_kernel(int* out) {
  const unsigned mask = threadIdx.x < 8 ? 0xffffffffu : 0xffffff00u;
  out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<int>(threadIdx.x), 1);
}

__global__ void plain_kernel(int* out) { out[threadIdx.x] = 1; }

struct Setup {
  c10::cuda::CUDAGuard guard{c10::Device(c10::kCPU)};
  c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  std::vector<int> out = std::vector<int>(4096, 0);
};

void warp_ops() {
  Setup s;
  warp_ops_kernel<<<1, kBlock, 0, s.stream>>>(s.out.data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1 << l;
  for (int t = 0; t < kBlock; ++t) {
    const int lane = t % 32, base = t - lane;
    const int expect[kOut] = {
        lane + 3 < 32 ? t + 3 : t,  // shfl_down: own value past the end of the warp
        lane % 8 >= 2 ? t - 2 : t,  // shfl_up within segments of 8
        t ^ 5,
        base + (lane * 7) % 32,
        base + (lane & 16) + 4,  // source lane 20 is lane 4 of each 16-lane segment
        every_third,
        t >= 32,  // any(t == 40): only the second warp has it
        t < 32,   // all(t < 40): only the first warp
        lane < 16 ? (t ^ 1) : (t ^ 2),
        13,
        1,
        1,
        kBlock * (kBlock - 1) / 2,
        0,
        111,
        kBlock * 100 + 11,
    };
    for (int k = 0; k < kOut; ++k)
      TORCH_CHECK(s.out[t * kOut + k] == expect[k], "cuda_emu selftest warp_ops: thread ", t, " result ", k, " is ",
                  s.out[t * kOut + k], ", expected ", expect[k]);
  }
}

void grid() {
  Setup s;
  const dim3 g(3, 2, 2), b(8, 4);
  grid_kernel<<<g, b, 0, s.stream>>>(s.out.data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int i = 0; i < 3 * 2 * 2 * 8 * 4; ++i)
    TORCH_CHECK(s.out[i] == 1, "cuda_emu selftest grid: slot ", i, " counted ", s.out[i], " times");
}

}  // namespace

// Runs the named scenario. The correct ones return normally; each broken one must raise the emulator's error.
void cuda_emu_selftest(const std::string& name) {
  if (name == "warp_ops") return warp_ops();
  if (name == "grid") return grid();
  if (name == "no_guard") {
    std::vector<int> o(32);
    auto stream = c10::cuda::getCurrentCUDAStream();
    plain_kernel<<<1, 32, 0, stream>>>(o.data());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  Setup s;
  int* out = s.out.data();
  if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<1, kBlock, 0, s.stream>>>(out);
  } else if (name == "barrier_after_exit") {
    barrier_after_exit_kernel<<<1, kBlock, 0, s.stream>>>(out);
  } else if (name == "partial_warp_shuffle") {
    partial_warp_shuffle_kernel<<<1, kBlock, 0, s.stream>>>(out);
  } else if (name == "lane_not_in_mask") {
    lane_not_in_mask_kernel<<<1, 32, 0, s.stream>>>(out);
  } else if (name == "shuffle_reads_outside_mask") {
    shuffle_reads_outside_mask_kernel<<<1, 32, 0, s.stream>>>(out);
  } else if (name == "mismatched_masks") {
    mismatched_masks_kernel<<<1, 32, 0, s.stream>>>(out);
  } else if (name == "mask_names_absent_lanes") {  // a 48-thread block: its second warp has 16 lanes
    full_mask_kernel<<<1, 48, 0, s.stream>>>(out);
  } else if (name == "grid_y_too_large") {
    plain_kernel<<<dim3(1, 65536), 32, 0, s.stream>>>(out);
  } else if (name == "empty_grid") {
    plain_kernel<<<0, 32, 0, s.stream>>>(out);
  } else if (name == "block_too_large") {
    plain_kernel<<<1, 1025, 0, s.stream>>>(out);
  } else if (name == "grid_narrowed") {
    const int64_t blocks = (int64_t(1) << 32) + 1;  // CUDA would launch 1 block
    plain_kernel<<<blocks, 32, 0, s.stream>>>(out);
  } else if (name == "default_stream") {
    plain_kernel<<<1, 32>>>(out);
  } else if (name == "unchecked_launch") {
    plain_kernel<<<1, 32, 0, s.stream>>>(out);
    plain_kernel<<<1, 32, 0, s.stream>>>(out);
  } else if (name == "unchecked_at_return") {
    plain_kernel<<<1, 32, 0, s.stream>>>(out);
    return;
  } else {
    TORCH_CHECK(false, "cuda_emu selftest: no scenario ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
