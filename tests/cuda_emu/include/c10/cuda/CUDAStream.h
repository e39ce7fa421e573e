// Stand-in for c10/cuda/CUDAStream.h under the test emulator (tests/cuda_emu): the current stream is a stream of its
// own, never the legacy default stream, so a launch that names no stream (or the default one) is caught.
#pragma once

#include <c10/core/Device.h>

#include "cuda_emu.h"

namespace cuda_emu {
cudaStream_t current_stream();
}

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  explicit CUDAStream(cudaStream_t s) : stream_(s) {}
  cudaStream_t stream() const { return stream_; }
  operator cudaStream_t() const { return stream_; }
  bool operator==(const CUDAStream& o) const { return stream_ == o.stream_; }
  bool operator!=(const CUDAStream& o) const { return stream_ != o.stream_; }

 private:
  cudaStream_t stream_;
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(cuda_emu::current_stream()); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(nullptr); }

}  // namespace cuda
}  // namespace c10
