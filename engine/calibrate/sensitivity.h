#pragma once
// Per layer ("block") and per bit-width sensitivity of the KV cache (PM-KVQ section "block-wise
// memory allocation"), measured directly: for layer l and bits b, the layer's keys (then values)
// of every calibration token are fake-quantized at b bits (PM-KVQ's per-token, per-KV-head
// asymmetric RTN) with all other layers exact, and the sensitivity is the mean KL divergence of
// the model's next-token distribution from the full-precision one:
//     s_K[b][l] = mean over samples and positions of KL(p_fp || p_{K_l at b bits}).
// PM-KVQ estimates the same loss change to first order from one backward pass,
// |(Q_b(K) - K) * dL/dK|; our engine has no backward pass, and the direct measurement is what that
// estimate approximates (at layers x bits x 2 forwards per sample). bench/RESULTS.md compares the
// block rankings of both on a trained model.
#include <functional>
#include <vector>

#include "engine/calibrate/allocate.h"
#include "engine/calibrate/calibration_data.h"

namespace pmkv::calibrate {

struct SensitivityOptions {
  std::vector<int> bits = {8, 4, 2};
  std::function<void(int64_t done, int64_t total)> on_progress;
};

Sensitivity measure_sensitivity(LocalModel& model, const CalibrationSet& data,
                                const SensitivityOptions& options);

// Fake quantization of `rows` rows of K or V ([rows, num_kv_heads * head_dim], row stride
// `stride`): each (token, KV head) group quantized and dequantized at `bits` with the KV codec.
void fake_quantize_rows(float* x, int64_t rows, int64_t stride, int32_t num_kv_heads,
                        int32_t head_dim, int bits);

}  // namespace pmkv::calibrate
