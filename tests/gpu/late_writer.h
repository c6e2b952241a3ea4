#pragma once
// Test helper for programmatic dependent launch (kernels/pdl.cuh): a kernel that lets the launch
// after it start at once (pdl_trigger), waits, and only then writes. A dependent kernel that
// reads those bytes before its pdl_wait() sees the old ones.
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

namespace pmkv::gputest {

struct LateCopy {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t bytes = 0;  // src and dst 16-byte aligned
};

// Sleeps `delay_us` (every thread, on the GPU's clock) after its pdl_trigger(), then performs the
// copies. A plain launch on `stream`; cudaErrorInvalidValue for unaligned copies.
cudaError_t launch_late_copies(const LateCopy& a, const LateCopy& b, uint32_t delay_us,
                               cudaStream_t stream);

// The PDL check of a launch: synchronizes the device (a non-blocking stream does not wait for
// the legacy stream's work), then on a fresh non-blocking stream runs launch_late_copies(a, b,
// delay_us) and `launch` (which should request programmatic dependent launch) right after it,
// and waits for both. Returns the first error of the writer, the launch and the wait.
cudaError_t run_after_late_copies(const LateCopy& a, const LateCopy& b, uint32_t delay_us,
                                  const std::function<cudaError_t(cudaStream_t)>& launch);

}  // namespace pmkv::gputest
