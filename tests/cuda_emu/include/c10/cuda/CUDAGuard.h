// Stand-in for c10/cuda/CUDAGuard.h under the test emulator (tests/cuda_emu): a guard only counts itself alive, and a
// launch with none alive is an error. (Emulated tensors live on the CPU, so the device itself is not checked.)
#pragma once

#include <c10/core/Device.h>
#include <optional>

namespace cuda_emu {
void guard_enter();
void guard_exit();
}

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) { cuda_emu::guard_enter(); }
  explicit CUDAGuard(c10::DeviceIndex) { cuda_emu::guard_enter(); }
  ~CUDAGuard() { cuda_emu::guard_exit(); }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device> d) {
    if (d) set_device(*d);
  }
  ~OptionalCUDAGuard() { reset(); }
  OptionalCUDAGuard(const OptionalCUDAGuard&) = delete;
  OptionalCUDAGuard& operator=(const OptionalCUDAGuard&) = delete;
  void set_device(c10::Device) {
    if (!alive_) cuda_emu::guard_enter();
    alive_ = true;
  }
  void reset() {
    if (alive_) cuda_emu::guard_exit();
    alive_ = false;
  }

 private:
  bool alive_ = false;
};

}  // namespace cuda
}  // namespace c10
