#pragma once
// Generator: runs a set of generation requests to completion on one backend and KV cache, batched:
// every step advances all unfinished sequences together (prompt chunks under a token budget, then
// one decode token each). The offline loop behind `pmkv generate` and the golden tests; the
// server's scheduler replaces it for online serving.
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/kv/kv_cache_manager.h"
#include "engine/sampling/sampling_params.h"
#include "engine/sampling/stop_checker.h"
#include "engine/tokenizer/tokenizer.h"

namespace pmkv {

struct GenerationRequest {
  std::vector<int32_t> prompt_ids;
  SamplingParams params;
};

struct GenerationResult {
  std::vector<int32_t> output_ids;
  std::optional<std::string> text;  // absent without a tokenizer
  FinishReason finish_reason = FinishReason::kLength;
  kv::SeqKvStats kv;  // the sequence's KV cache at the end (pages, bytes, tokens per bits)
};

struct GenerationTimings {
  int64_t prefill_tokens = 0;
  double prefill_seconds = 0;
  int64_t decode_tokens = 0;
  double decode_seconds = 0;
  double prefill_tokens_per_s() const {
    return prefill_seconds > 0 ? double(prefill_tokens) / prefill_seconds : 0.0;
  }
  double decode_tokens_per_s() const {
    return decode_seconds > 0 ? double(decode_tokens) / decode_seconds : 0.0;
  }
};

class Generator {
 public:
  struct Options {
    int32_t max_step_tokens = 2048;  // token budget of one step (prompt chunks + decode tokens)
  };
  // Called with each piece of newly final text of request i (never part of a stop string, never
  // an incomplete UTF-8 sequence).
  using OnText = std::function<void(size_t request, std::string_view text)>;

  // `tokenizer` may be null (id-level use: no text, no stop strings). `eos_ids` end a sequence
  // unless its params say ignore_eos.
  Generator(Backend& backend, kv::KvCacheManager& kv, const Tokenizer* tokenizer,
            std::vector<int32_t> eos_ids, Options options);

  // Validates every request (InvalidArgument naming the request and the problem) before running
  // any; every KV page taken is returned before this returns, also on error.
  std::vector<GenerationResult> run(std::span<const GenerationRequest> requests,
                                    const OnText& on_text = {});
  const GenerationTimings& timings() const { return timings_; }

 private:
  Backend& backend_;
  kv::KvCacheManager& kv_;
  const Tokenizer* tokenizer_;
  std::vector<int32_t> eos_ids_;
  Options options_;
  GenerationTimings timings_;
};

}  // namespace pmkv
