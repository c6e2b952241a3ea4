#include "engine/backend/key_scale_fold.h"

#include <string>

#include "engine/common/error.h"

namespace pmkv {

void validate_key_scales(const ModelConfig& cfg, const std::vector<std::vector<float>>& scales) {
  if (static_cast<int64_t>(scales.size()) != cfg.num_layers) {
    throw InvalidArgument("key scales: " + std::to_string(scales.size()) +
                          " layers for a model of " + std::to_string(cfg.num_layers));
  }
  for (size_t l = 0; l < scales.size(); ++l) {
    if (static_cast<int64_t>(scales[l].size()) != cfg.kv_width()) {
      throw InvalidArgument("key scales of layer " + std::to_string(l) + ": " +
                            std::to_string(scales[l].size()) + " values, expected " +
                            std::to_string(cfg.kv_width()));
    }
  }
}

void fold_key_scales_layer(const ModelConfig& cfg, std::span<const float> s, std::span<float> wqkv,
                           std::span<float> bqkv) {
  const int64_t H = cfg.hidden_size, d = cfg.head_dim, kvw = cfg.kv_width();
  const int64_t q_width = cfg.q_width(), group = cfg.group_size();
  for (int64_t c = 0; c < q_width; ++c) {  // query channel c of head c / d
    const float f = s[(c / d / group) * d + c % d];
    for (int64_t i = 0; i < H; ++i)
      wqkv[c * H + i] *= f;
    if (!bqkv.empty()) bqkv[c] *= f;
  }
  for (int64_t c = 0; c < kvw; ++c) {
    const float f = s[c];
    for (int64_t i = 0; i < H; ++i)
      wqkv[(q_width + c) * H + i] /= f;
    if (!bqkv.empty()) bqkv[q_width + c] /= f;
  }
}

}  // namespace pmkv
