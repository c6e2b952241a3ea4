// The decode split kernel for 8-bit pages and head_dim 128: bf16 and fp32 q, groups of up to 4
// query heads and of 5 to 8.
#include "kernels/attention/decode_kernel.cuh"
#include "kernels/attention/decode_launch.h"

namespace pmkv::kernels::decode_detail {

namespace {

template <typename TQ, int kCols>
cudaError_t launch(const KernelParams& p, const int32_t* item_ids, int num_items,
                   cudaStream_t stream) {
  constexpr int kSmem = Tile<8, 128>::kSmemBytes;
  auto* kernel = decode_split_kernel<8, 128, TQ, kCols>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return attr;
  kernel<<<dim3(num_items, p.num_kv_heads), kThreads, kSmem, stream>>>(p, item_ids);
  return cudaGetLastError();
}

}  // namespace

template <>
cudaError_t launch_split<8, 128>(const KernelParams& p, bool q_f32, const int32_t* item_ids,
                                 int num_items, cudaStream_t stream) {
  if (p.group <= 4) {
    return q_f32 ? launch<float, 1>(p, item_ids, num_items, stream)
                 : launch<__nv_bfloat16, 1>(p, item_ids, num_items, stream);
  }
  return q_f32 ? launch<float, 2>(p, item_ids, num_items, stream)
               : launch<__nv_bfloat16, 2>(p, item_ids, num_items, stream);
}

}  // namespace pmkv::kernels::decode_detail
