#pragma once
// Fills for weights that are not read from a checkpoint (`--load-format dummy`, vLLM's name for
// it): benchmark models of a real shape without a real file. Deterministic for a seed.
#include <cuda_runtime.h>

#include <cstdint>

namespace pmkv::kernels {

// p[i] = bf16(uniform in [-bound, bound)), from a counter-based hash of (seed, i): the same seed
// gives the same tensor whatever the launch shape.
cudaError_t launch_fill_uniform_bf16(uint16_t* p, int64_t n, uint64_t seed, float bound,
                                     cudaStream_t stream);

// p[i] = value.
cudaError_t launch_fill_f32(float* p, int64_t n, float value, cudaStream_t stream);

}  // namespace pmkv::kernels
