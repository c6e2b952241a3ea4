#pragma once
// Device helpers shared by the skinny GEMM's two kernels (skinny_gemm.cu: the register kernel;
// skinny_gemm_bulk.cuh: the bulk kernel): the tensor-core step on one 32-column block in the
// fragment layout described in skinny_gemm.cu, the load of `a`, and the output conversion.
#include <cuda_bf16.h>

#include <cstdint>

namespace pmkv::kernels::skinny_detail {

// 16 bytes through the non-coherent path, cached in L1 (the small, re-read activation block).
__device__ __forceinline__ uint4 load_cached(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// c += A * B for one m16n8k16 tile (bf16 inputs, fp32 accumulation).
__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int RT, int NT>
__device__ __forceinline__ void zero(float (&acc)[RT][NT][4]) {
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        acc[rt][nt][c] = 0.0f;
}

// One 32-k block: w fragments wv[rt][0] (row g) and wv[rt][1] (row g + 8), a fragments av[nt].
template <int NT, int RT>
__device__ __forceinline__ void mma_block(float (&acc)[RT][NT][4], const uint4 (&wv)[RT][2],
                                          const uint4 (&av)[NT]) {
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mma_bf16(acc[rt][nt], wv[rt][0].x, wv[rt][1].x, wv[rt][0].y, wv[rt][1].y, av[nt].x, av[nt].y);
      mma_bf16(acc[rt][nt], wv[rt][0].z, wv[rt][1].z, wv[rt][0].w, wv[rt][1].w, av[nt].z, av[nt].w);
    }
  }
}

template <class OutT>
__device__ __forceinline__ OutT convert_out(float v);
template <>
__device__ __forceinline__ float convert_out<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 convert_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace pmkv::kernels::skinny_detail
