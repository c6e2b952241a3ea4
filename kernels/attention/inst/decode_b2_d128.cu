// The decode split kernel for 2-bit pages and head_dim 128.
#include "kernels/attention/decode_split_launch.cuh"

namespace pmkv::kernels::decode_detail {

template cudaError_t launch_split<2, 128>(const KernelParams& p, bool q_f32, int ctas, bool pdl,
                                          bool dense, cudaStream_t stream);

}  // namespace pmkv::kernels::decode_detail
