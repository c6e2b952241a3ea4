#pragma once
// Key reparameterization with positional interpolation (PM-KVQ section 4, after SmoothAttention):
//  - max keys: per layer, KV head and RoPE pair j < head_dim/2, the max over calibration tokens
//    (positions stretched) of max(|k_j|, |k_{j + d/2}|), k after RoPE;
//  - rep scales: per layer, lambda = clamp(max_keys^alpha, 1e-4, 1e4) duplicated on both halves
//    (so it commutes with RoPE), alpha on a grid {1, 1 - 1/G, ..., 1/G}, chosen to minimize the MSE
//    between the layer's attention output (after o_proj) in full precision and with K / lambda
//    and V fake-quantized (k_bits, v_bits), each layer fed its full-precision inputs;
//  - the scales are folded into q_proj (x lambda) and k_proj (/ lambda) at load time
//    (CpuBackend::fold_key_scales), so the cache holds K / lambda with smaller channel outliers.
// Files are safetensors: "model.layers.{l}.self_attn.key_max" [kv_heads, head_dim / 2] and
// "model.layers.{l}.self_attn.key_scale" [kv_heads * head_dim], F32.
#include <filesystem>
#include <functional>
#include <vector>

#include "engine/calibrate/calibration_data.h"
#include "engine/model/model_config.h"

namespace pmkv::calibrate {

using PerLayer = std::vector<std::vector<float>>;

PerLayer measure_key_maxima(LocalModel& model, const CalibrationSet& data,
                            const std::function<void(int64_t, int64_t)>& on_progress = {});

struct RepScaleOptions {
  int32_t grid = 20;
  int k_bits = 4;
  int v_bits = 4;
  std::function<void(int64_t, int64_t)> on_progress;
};

struct RepScales {
  PerLayer scales;                 // [layers][kv_heads * head_dim]
  std::vector<double> alpha;       // chosen per layer
  std::vector<double> mse_plain;   // MSE with K and V quantized, no scales
  std::vector<double> mse_scaled;  // MSE with the chosen scales
};

RepScales search_rep_scales(LocalModel& model, const CalibrationSet& data,
                            const PerLayer& key_maxima, const RepScaleOptions& options);

// lambda for one layer: clamp(max^alpha, 1e-4, 1e4), [kv_heads, d/2] -> [kv_heads * d].
std::vector<float> scales_from_maxima(const std::vector<float>& maxima, int32_t num_kv_heads,
                                      int32_t head_dim, double alpha);

void write_key_maxima(const std::filesystem::path& file, const PerLayer& maxima,
                      const ModelConfig& cfg);
PerLayer read_key_maxima(const std::filesystem::path& file, const ModelConfig& cfg);
void write_key_scales(const std::filesystem::path& file, const RepScales& scales,
                      const ModelConfig& cfg);
// Throws LoadError naming the file and tensor when a layer is missing, mis-shaped, or a scale is
// not finite and positive, or the two halves of a RoPE pair differ.
PerLayer read_key_scales(const std::filesystem::path& file, const ModelConfig& cfg);

}  // namespace pmkv::calibrate
