#pragma once
// fp32 building blocks of the CPU backend. Row-major everywhere; weights are [out, in] as in
// Hugging Face checkpoints.
#include <cstdint>
#include <span>

namespace pmkv::cpu {

// C[m, n] = A[m, k] * W[n, k]^T (+ bias[n] when not empty). OpenBLAS sgemm.
void matmul_wt(const float* a, int64_t m, int64_t k, const float* w, int64_t n, float* c,
               std::span<const float> bias = {});

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for `rows` rows of `dim` values.
void rms_norm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps,
              float* out);

// Rotate-half RoPE in place on `num_heads` heads of `head_dim` values of one token:
// x[i] * cos + rotate_half(x)[i] * sin with angle position * inv_freq[i mod head_dim/2], the angle
// computed in fp32 as transformers does.
void rope_inplace(float* x, int64_t num_heads, int64_t head_dim, int32_t position,
                  std::span<const float> inv_freq);

// out[i] = silu(gate[i]) * up[i] for each row; gate_up rows are [gate (n) | up (n)].
void silu_mul(const float* gate_up, int64_t rows, int64_t n, float* out);

}  // namespace pmkv::cpu
