#pragma once
// Internal: the launcher of the decode split kernel for one (bits, head_dim), shared by the
// instantiation files inst/decode_b*_d*.cu (one explicit instantiation each, so they build in
// parallel and the supported set is the list of files).
#include "kernels/attention/decode_kernel.cuh"
#include "kernels/attention/decode_launch.h"

namespace pmkv::kernels::decode_detail {

// pdl: launched with programmatic dependent launch (DecodeParams::pdl).
template <int kBits, int kD, typename TQ, int kCols, bool kDense = false>
cudaError_t launch_split_as(const KernelParams& p, int ctas, bool pdl, cudaStream_t stream) {
  constexpr int kSmem = Tile<kBits, kD>::kSmemBytes;
  static_assert(!kDense || kSmem * BitsConfig<kBits>::kCtasPerSmDense <= 227 * 1024,
                "the dense variant's CTAs must fit an SM's shared memory");
  auto* kernel = decode_split_kernel<kBits, kD, TQ, kCols, kDense>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return attr;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(p.num_kv_heads));
  cfg.blockDim = dim3(BitsConfig<kBits>::kThreads);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute pdl_attr;
  request_pdl(cfg, pdl_attr, pdl);
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

// bf16 and fp32 q; groups of up to 4 query heads per KV head use one mma column block, 5 to 8 two.
// dense: the 4-CTA variant (2/4 bits, groups of at most 4; ignored elsewhere).
template <int kBits, int kD>
cudaError_t launch_split(const KernelParams& p, bool q_f32, int ctas, bool pdl, bool dense,
                         cudaStream_t stream) {
  if constexpr (BitsConfig<kBits>::kHasDense) {
    if (dense && p.group <= 4) {
      return q_f32 ? launch_split_as<kBits, kD, float, 1, true>(p, ctas, pdl, stream)
                   : launch_split_as<kBits, kD, __nv_bfloat16, 1, true>(p, ctas, pdl, stream);
    }
  }
  if (p.group <= 4) {
    return q_f32 ? launch_split_as<kBits, kD, float, 1>(p, ctas, pdl, stream)
                 : launch_split_as<kBits, kD, __nv_bfloat16, 1>(p, ctas, pdl, stream);
  }
  return q_f32 ? launch_split_as<kBits, kD, float, 2>(p, ctas, pdl, stream)
               : launch_split_as<kBits, kD, __nv_bfloat16, 2>(p, ctas, pdl, stream);
}

}  // namespace pmkv::kernels::decode_detail
