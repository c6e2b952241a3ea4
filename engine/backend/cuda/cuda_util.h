#pragma once
// RAII for the CUDA objects the CUDA backend owns (device memory, pinned host memory, streams,
// events) and a check that turns a CUDA error into an exception naming the call. Host-only; the
// backend's .cpp files include it, never the engine's public headers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "engine/common/error.h"

namespace pmkv::cuda {

// A CUDA failure inside the backend: the device is unusable for this step (out of memory, a
// launch error); the message names the call.
class CudaError : public Error {
 public:
  using Error::Error;
};

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw CudaError(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                    ")");
  }
}
#define PMKV_CUDA_CHECK(expr) ::pmkv::cuda::check((expr), #expr)

// Device memory: one cudaMalloc, freed on destruction. Bytes, not elements: typed views are taken
// with as<T>().
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) { allocate(bytes); }
  DeviceMemory(DeviceMemory&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() { release(); }

  void allocate(size_t bytes) {
    release();
    if (bytes == 0) return;
    PMKV_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    bytes_ = bytes;
  }
  // Grows to at least `bytes` (contents are not kept), by at least half its size: a buffer that
  // grows a little every step (page tables, penalty histories) then reallocates O(log) times,
  // not every step (cudaFree synchronizes the device, stalling the steps in flight). Returns
  // true when it reallocated.
  bool reserve(size_t bytes) {
    if (bytes <= bytes_) return false;
    allocate(std::max(bytes, bytes_ + bytes_ / 2));
    return true;
  }
  template <class T = void>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (so that async copies are truly async), grown on demand.
class PinnedMemory {
 public:
  PinnedMemory() = default;
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  ~PinnedMemory() { release(); }
  // Grows like DeviceMemory::reserve (a pinned allocation costs far more than a step's work).
  void reserve(size_t bytes) {
    if (bytes <= bytes_) return;
    bytes = std::max(bytes, bytes_ + bytes_ / 2);
    release();
    PMKV_CUDA_CHECK(cudaMallocHost(&ptr_, bytes));
    bytes_ = bytes;
  }
  template <class T = void>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// An event for ordering streams (no timing), or with cudaEventDefault for timing them.
class Event {
 public:
  explicit Event(unsigned flags = cudaEventDisableTiming) {
    PMKV_CUDA_CHECK(cudaEventCreateWithFlags(&e_, flags));
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() { cudaEventDestroy(e_); }
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

class Stream {
 public:
  Stream() { PMKV_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() { cudaStreamDestroy(s_); }
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

}  // namespace pmkv::cuda
