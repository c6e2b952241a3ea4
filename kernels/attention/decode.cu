// launch_decode: one launch of the split kernel (inst/decode_b*_d*.cu) per bit-width present; the
// split kernel also merges the partial states of sequences cut into several items.
#include "kernels/attention/decode.h"
#include "kernels/attention/decode_kernel.cuh"
#include "kernels/attention/decode_launch.h"

namespace pmkv::kernels {

#ifdef PMKV_DECODE_TRACE
namespace {
uint64_t* g_decode_trace = nullptr;  // the probe's buffer (decode_kernel.cuh), host-set
}  // namespace
void set_decode_trace(uint64_t* buffer) {
  g_decode_trace = buffer;
}
#endif

int decode_ctas_per_sm(int bits) {
  using namespace decode_detail;
  return bits == 16  ? BitsConfig<16>::kCtasPerSm
         : bits == 8 ? BitsConfig<8>::kCtasPerSm
         : bits == 4 ? BitsConfig<4>::kCtasPerSm
                     : BitsConfig<2>::kCtasPerSm;
}

int decode_dense_ctas_per_sm(int bits) {
  using namespace decode_detail;
  return bits == 4   ? BitsConfig<4>::kCtasPerSmDense
         : bits == 2 ? BitsConfig<2>::kCtasPerSmDense
                     : 0;
}

namespace {

// One launch per bit-width with CTAs (16, 8, 4, 2 in turn).
// One launch per bit-width with CTAs and in `mask` (16, 8, 4, 2 in turn).
template <int kD>
cudaError_t launch_all_bits(const decode_detail::KernelParams& kp, bool q_f32,
                            const DecodeLayerView& v, uint32_t mask, bool pdl,
                            cudaStream_t stream) {
  using decode_detail::launch_split;
  const auto on = [&](int b) { return v.split_ctas[b] > 0 && (mask >> b & 1u) != 0; };
  const auto dense = [&](int b) { return (v.dense_mask >> b & 1u) != 0; };
  const int32_t* n = v.split_ctas;
  cudaError_t e = cudaSuccess;
  if (e == cudaSuccess && on(0)) e = launch_split<16, kD>(kp, q_f32, n[0], pdl, false, stream);
  if (e == cudaSuccess && on(1)) e = launch_split<8, kD>(kp, q_f32, n[1], pdl, false, stream);
  if (e == cudaSuccess && on(2)) e = launch_split<4, kD>(kp, q_f32, n[2], pdl, dense(2), stream);
  if (e == cudaSuccess && on(3)) e = launch_split<2, kD>(kp, q_f32, n[3], pdl, dense(3), stream);
  return e;
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.group < 1 || p.group > kDecodeMaxGroup || p.num_kv_heads < 1 || p.tokens16 < 1 ||
      (p.head_dim != 64 && p.head_dim != 128) || p.page_bytes % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.q) % 16 != 0) {
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
    kp.merges = p.plan.merges;
    kp.merge_counters = p.plan.merge_counters;
    kp.partial_lse = p.plan.partial_lse;
    kp.partial_o = p.plan.partial_o;
    kp.q = p.q;
    kp.out = p.out;
    kp.out_dtype = p.out_dtype;
    kp.scale_log2 = p.scale * 1.4426950408889634f;
#ifdef PMKV_DECODE_TRACE
    kp.trace = g_decode_trace;
#endif
    const bool q_f32 = p.q_dtype == DType::kF32;
    const cudaError_t e = p.head_dim == 64
                              ? launch_all_bits<64>(kp, q_f32, p.plan, p.bits_mask, p.pdl, stream)
                              : launch_all_bits<128>(kp, q_f32, p.plan, p.bits_mask, p.pdl, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace pmkv::kernels
