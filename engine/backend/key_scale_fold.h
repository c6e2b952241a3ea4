#pragma once
// Key reparameterization (PM-KVQ / SmoothAttention), shared by the backends: per layer, per-channel
// scales [kv_heads * head_dim], equal on RoPE pairs (i, i + head_dim/2) so they commute with RoPE.
// k_proj rows (and bias) are divided and q_proj rows (and bias) multiplied by the scale of their
// channel (query head h uses KV head h / group), leaving q.k unchanged in exact arithmetic.
#include <span>
#include <vector>

#include "engine/model/model_config.h"

namespace pmkv {

// Throws InvalidArgument when `scales` is not [num_layers][kv_width].
void validate_key_scales(const ModelConfig& cfg, const std::vector<std::vector<float>>& scales);

// Folds one layer's scales into its stacked projection: wqkv is [q_width + 2 kv_width, hidden]
// (q rows, then k, then v), bqkv the matching bias or empty.
void fold_key_scales_layer(const ModelConfig& cfg, std::span<const float> scales,
                           std::span<float> wqkv, std::span<float> bqkv);

}  // namespace pmkv
