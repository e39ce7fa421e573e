// Stand-in for c10/cuda/CUDAException.h under the test emulator (tests/cuda_emu). As with CUDA, a launch with a bad
// configuration does not run and leaves an error that only the launch check reports; the emulator also requires the
// check after every launch.
#pragma once

#include <c10/util/Exception.h>

namespace cuda_emu {
void launch_check(const char* file, int line);  // throws c10::Error "CUDA error: ..." for a failed launch
}

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::launch_check(__FILE__, __LINE__)
