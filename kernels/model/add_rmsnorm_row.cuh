#pragma once
// The residual add + RMSNorm of one row (launch_add_rmsnorm, kernels/model/layer_ops.h) as a
// device function, shared by that kernel and by the skinny GEMM's fused tail
// (kernels/gemm/skinny_gemm_bulk.cuh): both visit the same columns from the same threads and
// reduce the sum of squares in the same order, so their outputs are bit-identical. Every rounding
// step the CPU backend performs is an explicitly rounded intrinsic (no FMA contraction).
// Included by .cu files only.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/model/layer_ops.h"

namespace pmkv::kernels::rmsnorm_detail {

inline constexpr int kNormThreads = 256;     // threads of a row in the CTA-per-row variant
inline constexpr int kWarpRowMaxDim = 1024;  // up to this dim a warp per row (<= 8 float4 a lane)

// fp32 to bf16 bits, round to nearest even (NaN stays NaN).
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t{float_to_bf16_bits(lo)} | (uint32_t{float_to_bf16_bits(hi)} << 16);
}

// kCg: through L2 only (ld.global.cg), for values other CTAs of the running grid stored.
template <int V, bool kCg = false>
__device__ __forceinline__ void load_v(const float* p, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 t =
        kCg ? __ldcg(reinterpret_cast<const float4*>(p)) : *reinterpret_cast<const float4*>(p);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      v[j] = kCg ? __ldcg(p + j) : p[j];
  }
}
template <int V>
__device__ __forceinline__ void store_v(float* p, const float (&v)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      p[j] = v[j];
  }
}
template <int V>
__device__ __forceinline__ void store_bf16_v(uint16_t* p, const float (&v)[V]) {
  if constexpr (V == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]));
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      p[j] = float_to_bf16_bits(v[j]);
  }
}

// y = x + (delta + bias) for the V columns at c, in the CPU's order: matmul_wt adds the bias to
// the sublayer output, then the forward adds that to x.
template <int V, bool kCg>
__device__ __forceinline__ void add_delta(const AddRmsNormParams& p, const float* ds, int c,
                                          float (&y)[V]) {
  float d[V];
  load_v<V, kCg>(ds + c, d);
  if (p.bias != nullptr) {
    float b[V];
    load_v<V>(p.bias + c, b);
#pragma unroll
    for (int j = 0; j < V; ++j)
      d[j] = __fadd_rn(d[j], b[j]);
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    y[j] = __fadd_rn(y[j], d[j]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Whether a row may use V = 4 (16-byte loads): dim % 4 == 0, x, delta, bias, weight 16-byte
// aligned and out 8-byte aligned (so every row start is too). Host and device.
__host__ __device__ inline bool add_rmsnorm_vec4(const AddRmsNormParams& p) {
  const auto at = [](const void* q, uintptr_t a) {
    return reinterpret_cast<uintptr_t>(q) % a == 0;
  };
  return p.dim % 4 == 0 && at(p.x, 16) && at(p.weight, 16) &&
         (p.delta == nullptr || at(p.delta, 16)) && (p.bias == nullptr || at(p.bias, 16)) &&
         at(p.out, 8);
}

// Output row r of launch_add_rmsnorm. kWarpRow: `tid` is the lane of one warp that does the row
// alone (the variant for dim <= kWarpRowMaxDim); else `tid` is one of kNormThreads threads whose
// barrier is `sync()` and whose warps' partial sums meet in `partial` (shared memory,
// kNormThreads / 32 floats; every thread reads them after the barrier, so the next row needs
// another buffer or another barrier first). Each thread visits the same columns in both passes,
// so with the residual write-back it rereads its own stores of y (program order: no barrier
// needed). kCg: delta is read through L2 only.
template <int V, bool kWarpRow, bool kCg, class Sync>
__device__ __forceinline__ void add_rmsnorm_row(const AddRmsNormParams& p, int r, int tid,
                                                float* partial, Sync sync) {
  constexpr int nthreads = kWarpRow ? 32 : kNormThreads;
  const int64_t s = p.row_index != nullptr ? p.row_index[r] : r;
  const int dim = p.dim;
  float* xs = p.x + s * dim;
  const float* ds = p.delta != nullptr ? p.delta + s * dim : nullptr;
  const bool write_back = p.row_index == nullptr && p.delta != nullptr;

  float ss = 0.0f;
  for (int c = tid * V; c < dim; c += nthreads * V) {
    float y[V];
    load_v<V>(xs + c, y);
    if (ds != nullptr) add_delta<V, kCg>(p, ds, c, y);
    if (write_back) store_v<V>(xs + c, y);
#pragma unroll
    for (int j = 0; j < V; ++j)
      ss = __fmaf_rn(y[j], y[j], ss);
  }
  ss = warp_sum(ss);
  if constexpr (!kWarpRow) {
    if ((tid & 31) == 0) partial[tid >> 5] = ss;
    sync();
    ss = 0.0f;  // every thread sums the partials in the same order: one inv for the row
#pragma unroll
    for (int w = 0; w < kNormThreads / 32; ++w)
      ss += partial[w];
  }
  // cpu::rms_norm: inv = 1 / sqrt(ss / dim + eps) (IEEE division and square root).
  const float inv =
      __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(dim)), p.eps)));

  uint16_t* o = p.out + int64_t{r} * dim;
  for (int c = tid * V; c < dim; c += nthreads * V) {
    float y[V], w[V];
    load_v<V>(xs + c, y);  // y itself when written back
    if (ds != nullptr && !write_back) add_delta<V, kCg>(p, ds, c, y);
    load_v<V>(p.weight + c, w);
#pragma unroll
    for (int j = 0; j < V; ++j)
      y[j] = __fmul_rn(w[j], __fmul_rn(y[j], inv));  // weight * (x * inv), as the CPU
    store_bf16_v<V>(o + c, y);
  }
}

}  // namespace pmkv::kernels::rmsnorm_detail
