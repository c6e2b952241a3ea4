#pragma once
// Skinny GEMM ("GEMV") for decode: d[m, n] = a[m, k] * w[n, k]^T with m <= 16, a and w bf16
// row-major (w is [out, in] as in Hugging Face checkpoints), fp32 accumulation, fp32 or bf16
// output. Memory-bound by design: the weight matrix is streamed exactly once with 16-byte
// coalesced loads (many in flight per thread), and the tiny activation block a is re-read from
// L1/L2. The products run on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate) with
// w as the 16-row operand and a as the 8-column operand, so the cost per weight byte does not
// grow with m (CUDA-core FMAs would be compute-bound near m = 16 on an H200).
//
// Two kernels. The register kernel (any k % 8 == 0) keeps each thread's weight loads in flight in
// registers and splits k across the warps of one CTA, never across CTAs. The bulk kernel (sm_90+,
// m <= 8, k % 1024 == 0, a workspace given; kernels/gemm/skinny_gemm_bulk.cuh) streams the weights
// into shared memory with cp.async.bulk, one CTA per SM, each CTA a contiguous range of whole row
// tiles (or, with stream_k or fewer tiles than CTAs, of units, with a fixed-order fix-up of split
// tiles through the workspace); a batch-1 token's GEMMs took 3.68 ms on an H200 (95% of copy
// bandwidth) against the register kernel's 4.56 (bench/RESULTS.md, twenty-third session). Both are
// deterministic (bit-identical run to run for a given configuration and SM count).
//
// The launcher only enqueues one kernel on `stream` (no host sync, no allocation, no device
// attribute queries; graph-capturable) and returns the launch error, or cudaErrorInvalidValue for
// parameters it rejects (without launching). m == 0 launches nothing.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kernels_common.h"
#include "kernels/model/layer_ops.h"

namespace pmkv::kernels {

inline constexpr int64_t kSkinnyGemmMaxM = 16;
// The bulk kernel takes m <= 8 (one 8-column tile of a). With stream-K, two tiles (m = 12, 16)
// were 10-30% slower than the register kernel on an H200. Split by whole tiles, on the compact
// footprint's units, they ran a token's GEMMs faster (m = 16: 4.36 against 4.57 ms), but batch
// 12-16 decode steps moved 0-2%: the wide products stay on cuBLASLt there and down got slower.
// So they are not built (bench/RESULTS.md, twenty-third session).
inline constexpr int64_t kSkinnyGemmBulkMaxM = 8;

struct SkinnyGemmParams {
  const uint16_t* a = nullptr;  // bf16 [m, k], row-major, 16-byte aligned
  const uint16_t* w = nullptr;  // bf16 [n, k], row-major, 16-byte aligned
  void* d = nullptr;            // [m, n] row-major, fp32 or bf16 (out); must not alias a or w
  DType out = DType::kF32;
  int64_t m = 0;  // 0..16
  int64_t n = 0;  // 1..2^31-1
  int64_t k = 0;  // 8..2^31-1, k % 8 == 0
  // The number of SMs of the device (the caller queries it once); 0 means 132 (H100/H200).
  int32_t num_sms = 0;
  // Tuning overrides, 0 = automatic: rows of w per warp tile (16 or 32) and the number of warps
  // of a CTA that split k for one warp tile (1, 2, 4 or 8; the CTA has 8 warps).
  int32_t warp_rows = 0;
  int32_t k_split = 0;
  // Programmatic dependent launch: the kernel may start while the previous kernel in the stream
  // runs and streams its first weights into L2 meanwhile (it waits for that kernel before reading
  // `a`). Hopper and newer; ignored (plain stream order) elsewhere.
  bool pdl = true;
  // The bulk kernel: allowed only when the device is sm_90 or newer (the caller knows) and a
  // workspace of skinny_gemm_workspace_bytes(n, num_sms) bytes or more is given, whose first
  // skinny_gemm_counter_bytes(n) bytes were zeroed once when it was allocated (every launch leaves
  // them zero again). Launches sharing a workspace must be ordered (one stream); they may differ in
  // n (the partials of split tiles sit at the workspace's end, clear of any product's counters).
  bool bulk = false;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  // SwiGLU epilogue (bulk kernel only; bf16 output; n % 16 == 0): w holds a fused gate/up
  // projection whose rows come in groups of 16, 8 gate rows then the same 8 up rows (group q:
  // gate rows 8q..8q+7, up rows 8q..8q+7; see kernels/model/layer_ops.h, GateUpLayout). d is then
  // [m, n / 2] and d[i, j] = bf16(silu(g) * u) as launch_silu_mul computes it from this GEMM's
  // bf16 output: g = float(bf16(gate_j)) + bias[j], u = float(bf16(up_j)) + bias[n / 2 + j]
  // (bias fp32 [n], or null). Bit-identical to the GEMM followed by launch_silu_mul.
  bool gated = false;
  const float* gate_bias = nullptr;
  // Residual add + RMSNorm after the product (bulk kernel only; fp32 output, not gated): once
  // every tile of d is stored, launch_add_rmsnorm(add_norm) is applied to it inside this launch,
  // bit-identical to that launch after the GEMM. add_norm must have delta == d, rows == m, dim ==
  // n and row_index == null (the residual add of a decoder's o and down projections, with the
  // next norm). Uses one more counter of the workspace (skinny_gemm_counter_bytes counts it).
  bool fuse_add_norm = false;
  AddRmsNormParams add_norm;
  // The bulk kernel's compact footprint (ignored by the register kernel): 1024-column units and a
  // ~100 KB ring, ~108 KB of shared memory and ~100 registers a thread against ~208 KB and 168,
  // so that its CTA fits on an SM beside one CTA of a small kernel before it (RoPE, a 16-bit
  // decode-attention CTA) and, under PDL, becomes resident and starts streaming weights while
  // that kernel runs. 0.8-1.7% slower alone; 1.3% faster a batch-1 token (bench/RESULTS.md,
  // eleventh session). Results equal to rounding (another k split: not bit-identical to the full
  // footprint; deterministic like it).
  bool compact = false;
  // The residual add + RMSNorm split across two products (bulk kernel; bench/RESULTS.md,
  // fifteenth session). The fused tail above makes one CTA run a row's norm after every other CTA
  // has finished, ~5 us at the end of a Llama-3-8B o or down projection at m = 1. Split, the
  // product before the norm adds each column of d to the residual as its tile completes
  // (add_residual: add_norm.x[i, j] += d[i, j] + add_norm.bias[j], in add_rmsnorm's order; fp32
  // output, not gated, any m), and the product after it normalizes its input row in its prologue,
  // in every CTA (norm_input: m == 1, k > 1024; `a` is not read, the row is add_norm.x normalized
  // with add_norm.weight and eps; CTA 0 also stores it to add_norm.out when that is set). The pair
  // is bit-identical to the first GEMM, launch_add_rmsnorm, and the second GEMM over its output.
  // A norm_input launch takes 2 k bytes more shared memory: skinny_gemm_norm_input_fits says
  // whether they fit.
  bool add_residual = false;
  bool norm_input = false;
  // The bulk kernel shares a launch's work out by whole row tiles when it has at least as many
  // tiles as CTAs, so that no CTA ends waiting on another's partial sums; true forces the split by
  // units (stream-K: every CTA the same bytes, tiles split between CTAs fixed up through the
  // workspace), which launches with fewer tiles than CTAs always take. Results differ by rounding
  // in the tiles stream-K splits (both deterministic).
  bool stream_k = false;
  // Claimed tiles (bulk kernel, where it splits by whole tiles; ignored elsewhere): the CTAs claim
  // whole tiles from a counter in the workspace as they go instead of taking fixed ranges, so
  // that CTAs on slower-streaming SMs take fewer (see skinny_gemm_bulk.cuh). Bit-identical to the
  // fixed ranges. Its two counters follow the launch's tile counters and the fused norm's, and
  // its producers use them before the PDL wait: the launch before it in the stream must not use
  // the same workspace claiming or with more tiles (it may still be running).
  bool claim = false;
};

// Workspace of the bulk kernel for outputs of up to max_n columns: tile counters, the fused
// norm's counter and the claimed tiles' two, then two partial tiles per CTA.
int64_t skinny_gemm_counter_bytes(int64_t max_n);
int64_t skinny_gemm_workspace_bytes(int64_t max_n, int32_t num_sms);

// Dynamic shared memory the bulk kernel asks for (the largest of its configurations): a device
// whose opt-in limit per block is smaller must not enable it.
int32_t skinny_gemm_bulk_smem_bytes();

// Whether a norm_input product of this k and footprint fits a block's shared memory on sm_90.
bool skinny_gemm_norm_input_fits(int64_t k, bool compact);

// Whether launch_skinny_gemm takes the bulk kernel for these parameters (gated ones are rejected
// when it does not).
bool skinny_gemm_uses_bulk(const SkinnyGemmParams& params);

// True when launch_skinny_gemm accepts these operands (shape and alignment; pointers non-null).
inline bool skinny_gemm_supported(const void* a, const void* w, const void* d, DType out, int64_t m,
                                  int64_t n, int64_t k) {
  const auto addr = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };
  return m >= 1 && m <= kSkinnyGemmMaxM && n >= 1 && n <= INT32_MAX && k >= 8 && k <= INT32_MAX &&
         k % 8 == 0 && a != nullptr && w != nullptr && d != nullptr && addr(a) % 16 == 0 &&
         addr(w) % 16 == 0 && addr(d) % dtype_bytes(out) == 0;
}

// d[i, j] = sum_l a[i, l] * w[j, l] for i < m, j < n (fp32 accumulation; bf16 outputs rounded to
// nearest even from the fp32 sum). Only d[0..m)[0..n) is written. Rejects (cudaErrorInvalidValue)
// what skinny_gemm_supported rejects, m == 0 aside (a no-op), and bad tuning overrides.
cudaError_t launch_skinny_gemm(const SkinnyGemmParams& params, cudaStream_t stream);

}  // namespace pmkv::kernels
