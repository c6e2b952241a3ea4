#pragma once
// GemmRunner: the dense products of the CUDA backend through cuBLASLt. Activations and weights are
// bf16, row-major, weights [out, in] as in Hugging Face checkpoints; accumulation in fp32; the
// output is fp32 or bf16. One algorithm per shape, chosen by cuBLASLt's heuristic on first use
// and cached (a decode step asks for the same few shapes every time). Skinny products (m <= 16,
// k % 8 == 0, a and w 16-byte aligned) run the bandwidth-bound kernel of
// kernels/gemm/skinny_gemm.h instead; PMKV_GEMM=cublaslt (read once, in the constructor) keeps
// every shape on cuBLASLt, for comparisons. PMKV_SKINNY_WARP_ROWS (16 | 32) and
// PMKV_SKINNY_K_SPLIT (1 | 2 | 4 | 8) override the skinny kernel's tiling, for tuning.
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

  // Whether run() with these operands takes the skinny kernel (rather than cuBLASLt).
  bool uses_skinny(const void* a, const void* w, const void* d, GemmOut out, int64_t m, int64_t n,
                   int64_t k) const;

 private:
  struct Plan;
  Plan& plan(int64_t m, int64_t n, int64_t k, GemmOut out);

  cudaStream_t stream_;
  void* handle_ = nullptr;  // cublasLtHandle_t (kept out of this header)
  DeviceMemory workspace_;
  bool skinny_enabled_ = true;
  int32_t num_sms_ = 0;
  int32_t skinny_warp_rows_ = 0, skinny_k_split_ = 0;
  bool skinny_pdl_ = true;
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, std::unique_ptr<Plan>> plans_;
};

}  // namespace pmkv::cuda
