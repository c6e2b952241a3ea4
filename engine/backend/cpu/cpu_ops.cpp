#include "engine/backend/cpu/cpu_ops.h"

#include <cblas.h>

#include <cmath>
#include <vector>

namespace pmkv::cpu {

void matmul_wt(const float* a, int64_t m, int64_t k, const float* w, int64_t n, float* c,
               std::span<const float> bias) {
  if (m == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, a, static_cast<blasint>(k), w,
              static_cast<blasint>(k), 0.0f, c, static_cast<blasint>(n));
  if (!bias.empty()) {
#pragma omp parallel for if (m * n > 65536)
    for (int64_t r = 0; r < m; ++r) {
      float* row = c + r * n;
      for (int64_t j = 0; j < n; ++j)
        row[j] += bias[j];
    }
  }
}

void rms_norm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps,
              float* out) {
#pragma omp parallel for if (rows > 8)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    float ss = 0.0f;
    for (int64_t i = 0; i < dim; ++i)
      ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i)
      o[i] = weight[i] * (xr[i] * inv);
  }
}

void rope_inplace(float* x, int64_t num_heads, int64_t head_dim, int32_t position,
                  std::span<const float> inv_freq) {
  const int64_t half = head_dim / 2;
  std::vector<float> c(half), s(half);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(position) * inv_freq[i];
    c[i] = std::cos(angle);
    s[i] = std::sin(angle);
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  }
}

void silu_mul(const float* gate_up, int64_t rows, int64_t n, float* out) {
#pragma omp parallel for if (rows * n > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * n;
    const float* u = g + n;
    float* o = out + r * n;
    for (int64_t i = 0; i < n; ++i)
      o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace pmkv::cpu
