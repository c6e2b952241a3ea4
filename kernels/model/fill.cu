#include <cuda_bf16.h>

#include "kernels/model/fill.h"

namespace pmkv::kernels {

namespace {

// splitmix64: a full-period mix of a 64-bit counter; good enough for random weights.
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__global__ void fill_uniform_bf16(__nv_bfloat16* p, int64_t n, uint64_t seed, float bound) {
  const uint64_t key = mix64(seed);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    // 24 random bits -> [0, 1) exactly representable in fp32.
    const float u = static_cast<float>(mix64(key ^ static_cast<uint64_t>(i)) >> 40) * 0x1p-24f;
    p[i] = __float2bfloat16_rn((2.0f * u - 1.0f) * bound);
  }
}

__global__ void fill_f32(float* p, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    p[i] = value;
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t launch_fill_uniform_bf16(uint16_t* p, int64_t n, uint64_t seed, float bound,
                                     cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  fill_uniform_bf16<<<grid_for(n), 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(p), n, seed,
                                                     bound);
  return cudaGetLastError();
}

cudaError_t launch_fill_f32(float* p, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  fill_f32<<<grid_for(n), 256, 0, stream>>>(p, n, value);
  return cudaGetLastError();
}

}  // namespace pmkv::kernels
