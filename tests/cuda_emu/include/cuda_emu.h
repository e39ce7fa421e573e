// The CUDA language as the test emulator provides it (test infrastructure, never part of the package).
//
// g++ force-includes this header (-include cuda_emu.h) before a .cu file whose launches the build rewrote from
// `kernel<<<grid, block, shmem, stream>>>(args)` to `launch(kernel, grid, block, shmem, stream)(args)`; nothing else
// in the file changes. Kernels then run on the CPU, a fiber per CUDA thread (emulator.cpp): blocks one after
// another, the threads of a block interleaved at their barriers and warp collectives. What runs is checked as the
// CUDA runtime checks a launch (grid and block limits), plus what CUDA leaves undefined or silent: a barrier or warp
// collective reached by only part of its block or warp, masks naming absent lanes, grid sizes narrowed to 32 bits, a
// launch with no device guard alive, off the current stream, or not followed by C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static copy of a __shared__ variable is the running block's shared memory.
#define __shared__ static

struct CUstream_st;
typedef CUstream_st* cudaStream_t;  // nullptr: the legacy default stream

namespace cuda_emu {
[[noreturn]] void narrowed(const char* axis, long long value);  // throws c10::Error
}

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  // CUDA narrows any integer to 32 bits here without a word; the emulator refuses a value that does not fit
  template <typename X, typename Y = unsigned int, typename Z = unsigned int,
            typename = std::enable_if_t<std::is_integral_v<X> && std::is_integral_v<Y> && std::is_integral_v<Z>>>
  dim3(X x_, Y y_ = 1, Z z_ = 1) : x(narrow(x_, "x")), y(narrow(y_, "y")), z(narrow(z_, "z")) {}

 private:
  template <typename T>
  static unsigned int narrow(T v, const char* what) {
    if constexpr (std::is_signed_v<T>) {
      if (v < 0) cuda_emu::narrowed(what, static_cast<long long>(v));
    }
    if (static_cast<unsigned long long>(v) > UINT_MAX) cuda_emu::narrowed(what, static_cast<long long>(v));
    return static_cast<unsigned int>(v);
  }
};
typedef dim3 uint3;

// Set by the scheduler before it resumes a thread; read by the kernels as CUDA's built-in variables.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace cuda_emu {

enum class Op : int { SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };
enum class Bar : int { Sync, Count, And, Or };

// A warp collective: blocks until every lane named in `mask` has arrived with the same op, mask and width. `bits`
// is this lane's operand; the result comes back the same way.
uint64_t warp_collective(Op op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
// __syncthreads and its counting variants: blocks until every thread of the block has arrived at this barrier.
int block_barrier(Bar kind, int pred, const char* file, int line);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

struct Config {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
  const char* file;
  int line;
};

// Runs a launch: checks it, then every thread of every block calls thread_main(ctx). Errors of the configuration
// are kept for C10_CUDA_KERNEL_LAUNCH_CHECK() as CUDA keeps them for cudaGetLastError().
void run(const Config& cfg, void (*thread_main)(void*), void* ctx);

template <typename G>
dim3 to_dim3(const G& g) {
  if constexpr (std::is_integral_v<G>) {
    return dim3(g);
  } else {
    return g;
  }
}

template <typename To, typename From>
To implicit(From&& v) {  // the implicit conversion a kernel call applies to each argument
  return std::forward<From>(v);
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  Config cfg;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    using Params = std::tuple<std::decay_t<P>...>;
    Params params(implicit<std::decay_t<P>>(std::forward<A>(args))...);
    struct Ctx {
      void (*kernel)(P...);
      Params* params;
    } ctx{kernel, &params};
    // each thread gets its own copy of the parameters, as each CUDA thread may change its own
    run(cfg, [](void* c) { std::apply(static_cast<Ctx*>(c)->kernel, *static_cast<Ctx*>(c)->params); }, &ctx);
  }
};

}  // namespace cuda_emu

// `kernel<<<grid, block, shmem, stream>>>(args)` after the build's rewrite. The call site's file and line name the
// launch in the emulator's messages and launch log.
template <typename... P, typename G, typename B>
cuda_emu::Launch<P...> launch(void (*kernel)(P...), const G& grid, const B& block, size_t shmem = 0,
                              cudaStream_t stream = nullptr, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return {kernel, {cuda_emu::to_dim3(grid), cuda_emu::to_dim3(block), shmem, stream, file, line}};
}

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emu::block_barrier(cuda_emu::Bar::Sync, 1, file, line);
}
inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_emu::block_barrier(cuda_emu::Bar::Count, p, file, line);
}
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_emu::block_barrier(cuda_emu::Bar::And, p, file, line);
}
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuda_emu::block_barrier(cuda_emu::Bar::Or, p, file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  cuda_emu::warp_collective(cuda_emu::Op::SyncWarp, mask, 0, 0, 32, file, line);
}

#define CUDA_EMU_SHFL(NAME, OP)                                                                            \
  template <typename T>                                                                                   \
  T NAME(unsigned mask, T v, int arg, int width = 32, const char* file = __builtin_FILE(),                 \
         int line = __builtin_LINE()) {                                                                   \
    return cuda_emu::from_bits<T>(                                                                        \
        cuda_emu::warp_collective(cuda_emu::Op::OP, mask, cuda_emu::to_bits(v), arg, width, file, line)); \
  }
CUDA_EMU_SHFL(__shfl_sync, ShflIdx)
CUDA_EMU_SHFL(__shfl_up_sync, ShflUp)
CUDA_EMU_SHFL(__shfl_down_sync, ShflDown)
CUDA_EMU_SHFL(__shfl_xor_sync, ShflXor)
#undef CUDA_EMU_SHFL

inline unsigned __ballot_sync(unsigned mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<unsigned>(cuda_emu::warp_collective(cuda_emu::Op::Ballot, mask, 0, p != 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(cuda_emu::warp_collective(cuda_emu::Op::Any, mask, 0, p != 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(cuda_emu::warp_collective(cuda_emu::Op::All, mask, 0, p != 0, 32, file, line));
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
