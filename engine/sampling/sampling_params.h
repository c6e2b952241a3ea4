#pragma once
// Per-request sampling and stopping parameters, with OpenAI / vLLM semantics. A plain struct: the
// frontends fill it from the request (and the model's generation_config.json defaults), call
// validate(), and the engine hands it to a Sampler and a StopChecker.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pmkv {

struct SamplingParams {
  // Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
  static constexpr float kGreedyTemperature = 1e-5f;

  float temperature = 1.0f;  // 0 (or < kGreedyTemperature) = greedy argmax
  int32_t top_k = 0;   // 0 or -1 = disabled; else keep the k most likely (ties at the k-th kept)
  float top_p = 1.0f;  // 1 = disabled; else keep the smallest head of mass >= top_p
  float min_p = 0.0f;  // 0 = disabled; else drop tokens with p < min_p * p_max
  // 1 = disabled. For every token in the prompt or the output: logit > 0 ? logit / r : logit * r.
  float repetition_penalty = 1.0f;
  // 0 = disabled. Over the OUTPUT tokens only: logit -= presence * (count > 0) + frequency * count.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::optional<uint64_t> seed;  // fixed seed: the same tokens whatever else is in the batch

  int32_t max_tokens = 16;              // generated tokens at most (finish reason "length")
  std::vector<std::string> stop;        // stop strings (finish reason "stop")
  std::vector<int32_t> stop_token_ids;  // stop tokens besides the model's EOS ids
  bool ignore_eos = false;              // keep generating after EOS
  bool include_stop_str_in_output = false;

  bool greedy() const { return temperature < kGreedyTemperature; }

  // Throws InvalidArgument naming the parameter and the accepted range when a value is out of
  // range: temperature < 0 or not finite; top_k < -1; top_p not in (0, 1]; min_p not in [0, 1];
  // repetition_penalty <= 0 or not finite; presence_penalty or frequency_penalty not in [-2, 2];
  // max_tokens < 1; an empty or invalid-UTF-8 stop string; a negative stop token id.
  void validate() const;
};

}  // namespace pmkv
