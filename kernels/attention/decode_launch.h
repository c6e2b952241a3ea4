#pragma once
// Internal: the per-(bits, head_dim) instantiations of the split kernel (inst/decode_b*_d*.cu),
// called by launch_decode (decode.cu).
#include <cuda_runtime.h>

#include <cstdint>

namespace pmkv::kernels::decode_detail {

struct KernelParams;

// Launches the split kernel of one bit-width with `ctas` CTAs per KV head (they loop over the
// layer's items of that bit-width); pdl: as DecodeParams::pdl; dense: the 4-CTA variant where the
// bit-width has one (DecodeLayerView::dense_mask).
template <int kBits, int kD>
cudaError_t launch_split(const KernelParams& p, bool q_f32, int ctas, bool pdl, bool dense,
                         cudaStream_t stream);

// Defined once in decode_split_launch.cuh; each inst/decode_b*_d*.cu instantiates one pair.
#define PMKV_DECODE_DECLARE(B, D)                                                             \
  extern template cudaError_t launch_split<B, D>(const KernelParams& p, bool q_f32, int ctas, \
                                                 bool pdl, bool dense, cudaStream_t stream);
PMKV_DECODE_DECLARE(16, 64)
PMKV_DECODE_DECLARE(8, 64)
PMKV_DECODE_DECLARE(4, 64)
PMKV_DECODE_DECLARE(2, 64)
PMKV_DECODE_DECLARE(16, 128)
PMKV_DECODE_DECLARE(8, 128)
PMKV_DECODE_DECLARE(4, 128)
PMKV_DECODE_DECLARE(2, 128)
#undef PMKV_DECODE_DECLARE

}  // namespace pmkv::kernels::decode_detail
