#pragma once
// Device code shared by the kernels that quantize a fresh K or V row into its page slot
// (kv/kv_ops.cu: launch_kv_write; model/layer_ops.cu: launch_rope_kv_write). One warp codes one
// (token, head) row of head_dim <= 256 values exactly like kv::quantize_group
// (engine/kv/kv_codec.cpp), so every writer leaves the same bytes in the page. CUDA only.
#include <cstdint>

#include "kernels/kv_page_layout.h"

namespace pmkv::kernels::kvq {

inline constexpr int kMaxHeadDim = 256;
// Values a lane holds of one row (head_dim <= 256 over 32 lanes).
inline constexpr int kRowSlots = kMaxHeadDim / 32;
// Shared-memory words a warp needs to assemble one packed row (16-bit codes of 256 values).
inline constexpr int kRowWords = kMaxHeadDim * 16 / 32;

template <int kBits>
__device__ __forceinline__ constexpr uint32_t qmax() {
  return kBits == 16 ? 65535u : (1u << kBits) - 1u;
}

// Min and max in the CPU's order: std::min/std::max from x[0] keep the first of equal values.
__device__ __forceinline__ void reduce_min_first(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (ov < v || (!(v < ov) && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}
__device__ __forceinline__ void reduce_max_first(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (v < ov || (!(ov < v) && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

// Quantizes one row held by the 32 lanes of a warp (all lanes must call it) into slot `slot`
// (already checked to be in [0, L.tokens)) of head h, K (kind 0) or V (kind 1), of `page`, laid
// out as L (kv::page_layout at kBits). Lane `lane` holds x[k] = element index(k) of the row, or
// index(k) < 0 for an empty slot. Invariant the tie-breaking relies on: a lane's indices increase
// with k (the per-lane scan keeps the first of equal values, the shuffles the lowest index), so
// min and max pick the same element as the CPU's left-to-right scan, which matters for signed
// zeros. sw: kRowWords words of shared memory private to the warp. Writes the whole code row
// (padding zeroed) and {scale, zero}.
template <int kBits, class Index>
__device__ __forceinline__ void quantize_row(const float (&x)[kRowSlots], Index index,
                                             const kv::PageLayout& L, uint8_t* page, int slot,
                                             int h, int kind, int lane, uint32_t* sw) {
  float lo = INFINITY, hi = -INFINITY;
  int lo_i = 1 << 30, hi_i = 1 << 30;
#pragma unroll
  for (int k = 0; k < kRowSlots; ++k) {
    const int i = index(k);
    if (i >= 0) {
      if (x[k] < lo || lo_i == (1 << 30)) {
        lo = x[k];
        lo_i = i;
      }
      if (hi < x[k] || hi_i == (1 << 30)) {
        hi = x[k];
        hi_i = i;
      }
    }
  }
  reduce_min_first(lo, lo_i);
  reduce_max_first(hi, hi_i);
  constexpr float kQmax = static_cast<float>(qmax<kBits>());
  float scale = __fdiv_rn(__fsub_rn(hi, lo), kQmax);
  scale = scale < 1e-5f ? 1e-5f : (1e5f < scale ? 1e5f : scale);  // std::clamp
  // Rounded to the page's param format first (bf16 at 4 and 2 bits), as the CPU codec does.
  scale = kv::stored_param(kBits, scale);
  const float zero = kv::stored_param(kBits, -lo);
  const int words = static_cast<int>(L.row / 4);
  __syncwarp();  // a previous row's readers of sw are done before it is cleared
  for (int w = lane; w < words; w += 32)
    sw[w] = 0u;
  __syncwarp();
#pragma unroll
  for (int k = 0; k < kRowSlots; ++k) {
    const int i = index(k);
    if (i >= 0) {
      float r = rintf(__fdiv_rn(__fadd_rn(x[k], zero), scale));  // nearbyint: half to even
      r = r < 0.0f ? 0.0f : (kQmax < r ? kQmax : r);
      atomicOr(&sw[(i * kBits) / 32], static_cast<uint32_t>(r) << ((i * kBits) % 32));
    }
  }
  __syncwarp();
  uint32_t* dst =
      reinterpret_cast<uint32_t*>(page + L.code_row(kind ? L.v_codes : L.k_codes, slot, h));
  for (int w = lane; w < words; w += 32)
    dst[w] = sw[w];
  if (lane == 0) {
    kv::store_params(page + L.param(kind ? L.v_params : L.k_params, slot, h), kBits, scale, zero);
  }
}

}  // namespace pmkv::kernels::kvq
