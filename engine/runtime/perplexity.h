#pragma once
// Perplexity of a model (through its KV cache) on a token stream: the quality yardstick of
// `pmkv eval`. Protocol: the tokens are cut into consecutive windows of `window` tokens (the last
// one shorter); each window is evaluated from an empty cache, fed in chunks of `chunk` tokens
// through the same cache path as serving, and scores the predictions of its positions 1..len-1.
// perplexity = exp(total NLL / predicted tokens).
#include <array>
#include <cstdint>
#include <functional>
#include <span>

#include "engine/backend/backend.h"
#include "engine/kv/kv_cache_manager.h"

namespace pmkv {

struct PerplexityResult {
  double nll = 0;         // summed negative log-likelihood (nats)
  int64_t predicted = 0;  // number of scored predictions
  int64_t windows = 0;
  double seconds = 0;
  // KV cache at the end of each window, summed over windows (divide by `windows` for a mean):
  int64_t kv_bytes = 0;                        // page bytes of the sequence, all layers
  std::array<int64_t, 4> kv_tokens_by_bits{};  // token-layers per bits (16, 8, 4, 2)
  int64_t demotions = 0;
  double perplexity() const;
};

struct PerplexityOptions {
  int32_t window = 2048;
  int32_t chunk = 512;
  std::function<void(int64_t done, int64_t total)> on_progress;  // tokens done / total
  // Called with the logits of every scored prediction (`index` counts them from 0 in order).
  std::function<void(int64_t index, std::span<const float> logits)> on_logits;
};

PerplexityResult evaluate_perplexity(Backend& backend, kv::KvCacheManager& kv,
                                     std::span<const int32_t> tokens,
                                     const PerplexityOptions& options);

}  // namespace pmkv
