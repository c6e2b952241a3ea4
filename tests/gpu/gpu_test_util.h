#pragma once
// Helpers of the GPU tests: checked CUDA calls, device buffers, bf16 on the host, seeds.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define CUDA_REQUIRE(expr)                                  \
  do {                                                      \
    const cudaError_t pmkv_err_ = (expr);                   \
    INFO(#expr << " -> " << cudaGetErrorString(pmkv_err_)); \
    REQUIRE(pmkv_err_ == cudaSuccess);                      \
  } while (0)

// After a launch: the launch error, then the execution error.
#define CUDA_REQUIRE_LAUNCH(expr)          \
  do {                                     \
    CUDA_REQUIRE(expr);                    \
    CUDA_REQUIRE(cudaGetLastError());      \
    CUDA_REQUIRE(cudaDeviceSynchronize()); \
  } while (0)

namespace pmkv::gputest {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { resize(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  void resize(size_t n) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = n;
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) {
      std::fprintf(stderr, "cudaMalloc of %zu bytes failed\n", n * sizeof(T));
      std::abort();
    }
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  cudaError_t upload(const std::vector<T>& h) {
    if (h.size() != n_) resize(h.size());
    return h.empty() ? cudaSuccess : cudaMemcpy(ptr_, h.data(), bytes(), cudaMemcpyHostToDevice);
  }
  cudaError_t download(std::vector<T>& h) const {
    h.resize(n_);
    return h.empty() ? cudaSuccess : cudaMemcpy(h.data(), ptr_, bytes(), cudaMemcpyDeviceToHost);
  }
  cudaError_t poison() { return cudaMemset(ptr_, 0xFF, bytes()); }  // NaN in f32 and bf16

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

inline uint16_t to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t b) {
  const uint32_t u = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf16(float f) {
  return from_bf16(to_bf16(f));
}

// Whether the current device is Hopper or newer (sm_90+ kernel paths).
inline bool device_is_sm90() {
  int dev = 0, major = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         major >= 9;
}

// A fresh seed per run (PMKV_TEST_SEED fixes it); printed so a failure can be replayed.
inline uint32_t test_seed(const char* what) {
  static const uint32_t base = [] {
    const char* env = std::getenv("PMKV_TEST_SEED");
    return env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10))
                          : std::random_device{}();
  }();
  uint32_t h = base;
  for (const char* c = what; *c != 0; ++c)
    h = h * 16777619u ^ static_cast<uint8_t>(*c);
  std::printf("[seed] %s: PMKV_TEST_SEED=%u\n", what, base);
  return h;
}

}  // namespace pmkv::gputest
