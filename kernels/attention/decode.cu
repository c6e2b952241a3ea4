// launch_decode: the split kernel (inst/decode_d*.cu) and the log-sum-exp merge of the partial
// states of sequences cut into several items.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/attention/decode.h"
#include "kernels/attention/decode_kernel.cuh"
#include "kernels/attention/decode_launch.h"
#include "kernels/pdl.cuh"

namespace pmkv::kernels {

namespace {

struct MergeParams {
  const DecodeLayerPlan* layer;   // device: the layer's merge_begin and num_merges
  const DecodeMergeItem* merges;  // every layer's merge entries
  const float* partial_lse;       // [num_items * num_kv_heads, group]
  const float* partial_o;         // [num_items * num_kv_heads, group, head_dim]
  void* out;                      // [num_seqs, num_kv_heads * group, head_dim]
  DType out_dtype;
  int32_t num_kv_heads;
  int32_t group;
  int32_t head_dim;
};

// CTAs over (merge entries, KV head), entries blockIdx.x, + gridDim.x, ... of the layer's list:
// out = sum_i 2^(lse_i - max) o_i / sum_i 2^(lse_i - max).
__global__ void __launch_bounds__(128) decode_merge_kernel(const MergeParams p) {
  pdl_trigger();  // the o projection after it may start streaming its weights
  const int n = p.layer->num_merges;
  const DecodeMergeItem* merges = p.merges + p.layer->merge_begin;
  const int kvh = blockIdx.y, G = p.group, D = p.head_dim;
  for (int e = blockIdx.x; e < n; e += gridDim.x) {
    const DecodeMergeItem mi = merges[e];
    const int64_t out_row = (int64_t{mi.seq} * p.num_kv_heads + kvh) * G;
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
      const int h = idx / D, d = idx % D;
      float mx = -INFINITY;
      for (int i = 0; i < mi.num_items; ++i) {
        const int64_t slot = int64_t{mi.item_begin + i} * p.num_kv_heads + kvh;
        mx = fmaxf(mx, p.partial_lse[slot * G + h]);
      }
      float den = 0.0f, num = 0.0f;
      for (int i = 0; i < mi.num_items; ++i) {
        const int64_t slot = int64_t{mi.item_begin + i} * p.num_kv_heads + kvh;
        const float f = exp2f(p.partial_lse[slot * G + h] - mx);
        den += f;
        num += f * p.partial_o[(slot * G + h) * D + d];
      }
      const float val = mi.num_items > 0 ? num / den : 0.0f;
      const int64_t o = (out_row + h) * D + d;
      if (p.out_dtype == DType::kF32) {
        static_cast<float*>(p.out)[o] = val;
      } else {
        static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16_rn(val);
      }
    }
  }
}

}  // namespace

int decode_ctas_per_sm(int bits) {
  using namespace decode_detail;
  return bits == 16  ? BitsConfig<16>::kCtasPerSm
         : bits == 8 ? BitsConfig<8>::kCtasPerSm
         : bits == 4 ? BitsConfig<4>::kCtasPerSm
                     : BitsConfig<2>::kCtasPerSm;
}

namespace {

// One launch per bit-width with CTAs (16, 8, 4, 2 in turn).
template <int kD>
cudaError_t launch_all_bits(const decode_detail::KernelParams& kp, bool q_f32,
                            const DecodeLayerView& v, cudaStream_t stream) {
  using decode_detail::launch_split;
  cudaError_t e = cudaSuccess;
  if (e == cudaSuccess && v.split_ctas[0] > 0)
    e = launch_split<16, kD>(kp, q_f32, v.split_ctas[0], stream);
  if (e == cudaSuccess && v.split_ctas[1] > 0)
    e = launch_split<8, kD>(kp, q_f32, v.split_ctas[1], stream);
  if (e == cudaSuccess && v.split_ctas[2] > 0)
    e = launch_split<4, kD>(kp, q_f32, v.split_ctas[2], stream);
  if (e == cudaSuccess && v.split_ctas[3] > 0)
    e = launch_split<2, kD>(kp, q_f32, v.split_ctas[3], stream);
  return e;
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.group < 1 || p.group > kDecodeMaxGroup || p.num_kv_heads < 1 || p.tokens16 < 1 ||
      (p.head_dim != 64 && p.head_dim != 128) || p.page_bytes % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.plan.layer == nullptr) return cudaErrorInvalidValue;
  for (int b = 0; b < 4; ++b) {
    if (p.plan.split_ctas[b] < 0) return cudaErrorInvalidValue;
  }
  if (p.plan.split_ctas[0] + p.plan.split_ctas[1] + p.plan.split_ctas[2] + p.plan.split_ctas[3] >
      0) {
    decode_detail::KernelParams kp;
    kp.pool = static_cast<const uint8_t*>(p.pool);
    kp.page_bytes = p.page_bytes;
    kp.num_kv_heads = p.num_kv_heads;
    kp.group = p.group;
    kp.tokens16 = p.tokens16;
    kp.page_ids = p.page_ids;
    kp.page_tokens = p.page_tokens;
    kp.layer = p.plan.layer;
    kp.items = p.plan.items;
    kp.bit_items = p.plan.bit_items;
    kp.partial_lse = p.plan.partial_lse;
    kp.partial_o = p.plan.partial_o;
    kp.q = p.q;
    kp.out = p.out;
    kp.out_dtype = p.out_dtype;
    kp.scale_log2 = p.scale * 1.4426950408889634f;
    const bool q_f32 = p.q_dtype == DType::kF32;
    const cudaError_t e = p.head_dim == 64 ? launch_all_bits<64>(kp, q_f32, p.plan, stream)
                                           : launch_all_bits<128>(kp, q_f32, p.plan, stream);
    if (e != cudaSuccess) return e;
  }
  if (p.plan.merge_ctas > 0) {
    MergeParams mp{p.plan.layer,     p.plan.merges, p.plan.partial_lse,
                   p.plan.partial_o, p.out,         p.out_dtype,
                   p.num_kv_heads,   p.group,       p.head_dim};
    decode_merge_kernel<<<dim3(p.plan.merge_ctas, p.num_kv_heads), 128, 0, stream>>>(mp);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace pmkv::kernels
