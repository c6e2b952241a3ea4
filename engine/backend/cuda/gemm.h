#pragma once
// GemmRunner: the dense products of the CUDA backend through cuBLASLt. Activations and weights are
// bf16, row-major, weights [out, in] as in Hugging Face checkpoints; accumulation in fp32; the
// output is fp32 or bf16. One algorithm per shape, chosen by cuBLASLt's heuristic on first use
// and cached (a decode step asks for the same few shapes every time). Skinny products (m <= 16,
// k % 8 == 0, a and w 16-byte aligned) run the bandwidth-bound kernel of
// kernels/gemm/skinny_gemm.h instead (its bulk kernel on sm_90+, with a workspace the runner owns;
// PMKV_SKINNY_BULK=0 keeps the register kernel); PMKV_GEMM=cublaslt (read once, in the constructor)
// keeps every shape on cuBLASLt, for comparisons. PMKV_SKINNY_WARP_ROWS (16 | 32) and
// PMKV_SKINNY_K_SPLIT (1 | 2 | 4 | 8) override the skinny kernel's tiling, for tuning.
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "engine/backend/cuda/cuda_util.h"
#include "kernels/gemm/skinny_gemm.h"

namespace pmkv::cuda {

enum class GemmOut { kF32, kBF16 };

// The skinny GEMM bulk kernel's footprint (kernels::SkinnyGemmParams::compact): kCompact lets a
// CTA share an SM with one CTA of the small kernel before it, so that it starts streaming weights
// under PDL while that kernel runs.
enum class GemmFootprint { kFull, kCompact };

class GemmRunner {
 public:
  explicit GemmRunner(cudaStream_t stream, size_t workspace_bytes = size_t{32} << 20);
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  // d[m, n] = a[m, k] * w[n, k]^T on the runner's stream. m == 0 is a no-op.
  // norm_in (split_norm): the product normalizes its input row itself (a is not read; see
  // kernels::SkinnyGemmParams::norm_input; norm_in->dim must be k).
  void run(const void* a, const void* w, void* d, GemmOut out, int64_t m, int64_t n, int64_t k,
           GemmFootprint fp = GemmFootprint::kFull,
           const kernels::AddRmsNormParams* norm_in = nullptr);

  // The fused gate/up projection with its SwiGLU activation in one launch: act[m, n / 2] =
  // bf16(silu(gate) * up) from w's rows in kernels::GateUpLayout::kInterleaved8 order; bias: fp32
  // [n], the n / 2 gate biases then the up biases (not interleaved, as launch_silu_mul takes
  // them), or null. Launches and returns true when the skinny GEMM's bulk kernel takes the shape (m
  // <= 8, sm_90+), else does nothing and returns false (the caller runs the GEMM and
  // launch_silu_mul). Bit-identical to run() + launch_silu_mul on the same shape.
  bool run_gated(const void* a, const void* w, void* act, const float* bias, int64_t m, int64_t n,
                 int64_t k, GemmFootprint fp = GemmFootprint::kFull,
                 const kernels::AddRmsNormParams* norm_in = nullptr);

  // The residual add + RMSNorm split over two launches (kernels::SkinnyGemmParams::add_residual,
  // norm_input): at m == 1 the fused tail of run_add_norm costs ~5 us at the end of each o and
  // down projection of Llama-3-8B (one CTA does the row after all others finish); split, run_add
  // adds d to x column by column and the next product, run() or run_gated() with norm_in, computes
  // the normalized row in every CTA's prologue. Bit-identical to run_add_norm then the product.
  // split_norm says whether rows of k columns (the hidden size) can take it: m == 1, the bulk
  // kernel available (the caller checks uses_bulk for each product involved), 1024 < k <= 8192,
  // and neither PMKV_SPLIT_NORM=0 nor PMKV_FUSED_NORM=0 (read once, in the constructor) set.
  bool split_norm(int64_t m, int64_t k, GemmFootprint fp) const;
  void run_add(const void* a, const void* w, float* d, int64_t m, int64_t n, int64_t k, float* x,
               const float* bias, GemmFootprint fp = GemmFootprint::kFull);

  // d[m, n] = a * w^T (fp32), then launch_add_rmsnorm(norm) with norm.delta = d, rows = m, dim =
  // n (the residual add of a decoder's o or down projection and the norm after it; norm.row_index
  // must be null). At m == 1, when the bulk kernel takes the shape, one launch: its fused tail
  // (SkinnyGemmParams::fuse_add_norm), bit-identical to the two. PMKV_FUSED_NORM=0 (read once, in
  // the constructor) keeps the two launches, for comparisons.
  void run_add_norm(const void* a, const void* w, float* d, int64_t m, int64_t n, int64_t k,
                    const kernels::AddRmsNormParams& norm, GemmFootprint fp = GemmFootprint::kFull);

  // The footprint for a decoder layer's product `p` at m rows (PMKV_COMPACT_GEMM, read once in
  // the constructor, overrides it for comparisons: 1 = compact for every product at m == 1, 0 =
  // full everywhere).
  // - m = 2..8: the gate/up projection compact, the others full. On an H200, batch 2-8 x 4K decode
  //   steps ran 0.8-3.6% faster with it (16 and 2 bits, three interleaved rounds; bench/RESULTS.md,
  //   twenty-fourth session). Compact qkv and o as well were slower at 16 bits (+0.5 to +1.8% at
  //   batch 2 and 4): a compact CTA beside the decode attention that surrounds them slows it.
  // - m = 1: full. Compact made a batch-1 token 1.3% faster when it came (eleventh session); since
  //   the split norm and the decode kernel's shorter tail it is ~1% slower (seventeenth session;
  //   a compact o projection beside batch-1 attention slows the attention's tiles ~2x).
  enum class LayerProduct { kQkv, kO, kGateUp, kDown };
  GemmFootprint layer_footprint(int64_t m, LayerProduct p) const {
    if (compact_override_ >= 0) {
      return compact_override_ == 1 && m == 1 ? GemmFootprint::kCompact : GemmFootprint::kFull;
    }
    return p == LayerProduct::kGateUp && m >= 2 && m <= 8 ? GemmFootprint::kCompact
                                                          : GemmFootprint::kFull;
  }

  // Bulk products of at least this many output columns claim their tiles as they go
  // (kernels::SkinnyGemmParams::claim): lm_head (128K columns at Llama-3 shapes). PMKV_BULK_CLAIM=0
  // (read once, in the constructor) keeps fixed ranges, for comparisons.
  static constexpr int64_t kBulkClaimMinN = 65536;

  // Whether run() with these operands takes the skinny GEMM's bulk kernel.
  bool uses_bulk(const void* a, const void* w, const void* d, GemmOut out, int64_t m, int64_t n,
                 int64_t k) const;

  // At m = 9..16 (two 8-column tiles of a, the register kernel) outputs of this many columns or
  // more take cuBLASLt: on an H200 at m = 16 it ran gate/up (n 28672) in 59.3 us against 69.8
  // and lm_head (n 128256) in 255 us against 297, and batch-16 decode steps 2-5% faster with it
  // there; the narrower qkv (6144), o and down (4096) stay on the skinny GEMM (bench/RESULTS.md,
  // thirteenth session). PMKV_SKINNY_WIDE=1 (read once, in the constructor) keeps them skinny.
  static constexpr int64_t kSkinnyWideMinN = 16384;

  // Whether run() with these operands takes the skinny kernel (rather than cuBLASLt).
  bool uses_skinny(const void* a, const void* w, const void* d, GemmOut out, int64_t m, int64_t n,
                   int64_t k) const;

 private:
  struct Plan;
  Plan& plan(int64_t m, int64_t n, int64_t k, GemmOut out);
  kernels::SkinnyGemmParams skinny_params(const void* a, const void* w, void* d, GemmOut out,
                                          int64_t m, int64_t n, int64_t k,
                                          GemmFootprint fp = GemmFootprint::kFull) const;

  cudaStream_t stream_;
  void* handle_ = nullptr;  // cublasLtHandle_t (kept out of this header)
  static constexpr int64_t kBulkMaxN = int64_t{1} << 22;
  DeviceMemory workspace_;
  DeviceMemory skinny_ws_;  // the skinny GEMM's bulk kernel: counters (zeroed) and partials
  bool skinny_enabled_ = true;
  int32_t num_sms_ = 0;
  int32_t skinny_warp_rows_ = 0, skinny_k_split_ = 0;
  bool skinny_pdl_ = true;
  bool skinny_wide_ = false;
  bool fuse_norm_ = true;
  int compact_override_ = -1;  // PMKV_COMPACT_GEMM: -1 unset, 0 or 1
  bool bulk_stream_k_ = false;
  bool bulk_claim_ = true;
  bool split_norm_ = true;
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, std::unique_ptr<Plan>> plans_;
};

}  // namespace pmkv::cuda
