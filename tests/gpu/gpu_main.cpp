// Catch2 runner of the GPU tests: exits 77 (ctest SKIP_RETURN_CODE) when no GPU is usable, so CPU
// CI builds the binary and skips it. PMKV_GPU_TEST_HOST_ONLY=1 runs the host-only cases ([host]).
#define CATCH_CONFIG_RUNNER
#include <cuda_runtime.h>
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (std::getenv("PMKV_GPU_TEST_HOST_ONLY") != nullptr) {
    const char* args[] = {argv[0], "[host]"};
    return Catch::Session().run(2, args);
  }
  if (e != cudaSuccess || n == 0) {
    std::printf("no usable GPU (%s): skipped\n", cudaGetErrorString(e));
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
    std::printf("device: %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major,
                prop.minor);
  }
  return Catch::Session().run(argc, argv);
}
