#pragma once
// GemmRunner: the dense products of the CUDA backend through cuBLASLt. Activations and weights are
// bf16, row-major, weights [out, in] as in Hugging Face checkpoints; accumulation in fp32; the
// output is fp32 or bf16. One algorithm per shape, chosen by cuBLASLt's heuristic on first use
// and cached (a decode step asks for the same few shapes every time).
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "engine/backend/cuda/cuda_util.h"

namespace pmkv::cuda {

enum class GemmOut { kF32, kBF16 };

class GemmRunner {
 public:
  explicit GemmRunner(cudaStream_t stream, size_t workspace_bytes = size_t{32} << 20);
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  // d[m, n] = a[m, k] * w[n, k]^T on the runner's stream. m == 0 is a no-op.
  void run(const void* a, const void* w, void* d, GemmOut out, int64_t m, int64_t n, int64_t k);

 private:
  struct Plan;
  Plan& plan(int64_t m, int64_t n, int64_t k, GemmOut out);

  cudaStream_t stream_;
  void* handle_ = nullptr;  // cublasLtHandle_t (kept out of this header)
  DeviceMemory workspace_;
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, std::unique_ptr<Plan>> plans_;
};

}  // namespace pmkv::cuda
