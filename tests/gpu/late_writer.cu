#include "tests/gpu/late_writer.h"

#include "kernels/pdl.cuh"

namespace pmkv::gputest {

namespace {

__device__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ void copy(const LateCopy& c) {
  const auto* s = static_cast<const uint4*>(c.src);
  auto* d = static_cast<uint4*>(c.dst);
  const int64_t n = c.bytes / 16, stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n; i += stride)
    d[i] = s[i];
  if (first < c.bytes % 16) {  // the tail, a byte a thread
    static_cast<uint8_t*>(c.dst)[n * 16 + first] =
        static_cast<const uint8_t*>(c.src)[n * 16 + first];
  }
}

__global__ void late_copies_kernel(const LateCopy a, const LateCopy b, uint32_t delay_us) {
  kernels::pdl_trigger();
  const uint64_t t0 = global_ns();
  while (global_ns() - t0 < uint64_t{delay_us} * 1000u)
    __nanosleep(1000);
  copy(a);
  copy(b);
}

bool valid(const LateCopy& c) {
  return c.bytes >= 0 && (c.bytes == 0 || (reinterpret_cast<uintptr_t>(c.src) % 16 == 0 &&
                                           reinterpret_cast<uintptr_t>(c.dst) % 16 == 0));
}

}  // namespace

cudaError_t launch_late_copies(const LateCopy& a, const LateCopy& b, uint32_t delay_us,
                               cudaStream_t stream) {
  if (!valid(a) || !valid(b)) return cudaErrorInvalidValue;
  late_copies_kernel<<<16, 256, 0, stream>>>(a, b, delay_us);
  return cudaGetLastError();
}

cudaError_t run_after_late_copies(const LateCopy& a, const LateCopy& b, uint32_t delay_us,
                                  const std::function<cudaError_t(cudaStream_t)>& launch) {
  if (const cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return e;
  cudaStream_t st = nullptr;
  if (const cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
      e != cudaSuccess) {
    return e;
  }
  const cudaError_t writer = launch_late_copies(a, b, delay_us, st);
  const cudaError_t dependent = writer == cudaSuccess ? launch(st) : cudaSuccess;
  const cudaError_t wait = cudaStreamSynchronize(st);
  const cudaError_t destroy = cudaStreamDestroy(st);
  for (const cudaError_t e : {writer, dependent, wait, destroy}) {
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace pmkv::gputest
