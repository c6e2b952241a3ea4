#pragma once
// 16-byte cp.async (LDGSTS) global -> shared through L2 only, shared by the decode and prefill
// attention kernels and bench/bench_weight_stream.cu. No L2 cache hint: the evict-first policy
// the bulk GEMM's cp.async.bulk copies pass (kernels/gemm/bulk_copy.cuh), and one made by
// createpolicy.fractional.L2::evict_first, both stopped kernels with "illegal instruction" on an
// H200 when given to cp.async (bench/RESULTS.md, twenty-fifth session).
#include <cstdint>

namespace pmkv::kernels {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

}  // namespace pmkv::kernels
