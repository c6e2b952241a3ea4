#pragma once
// Token selection for one sequence: logits processors in vLLM's order, then greedy or seeded
// random sampling. CPU reference implementation over one row of logits.
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/sampling/sampling_params.h"

namespace pmkv {

class Sampler {
 public:
  // The RNG (std::mt19937_64) is seeded with params.seed, else with fallback_seed, else with a
  // seed drawn from std::random_device. One Sampler per sequence, so a seeded request gives the
  // same tokens whatever else is in the batch. params must be valid (SamplingParams::validate()).
  explicit Sampler(SamplingParams params, std::optional<uint64_t> fallback_seed = std::nullopt);

  // Picks the next token of the sequence from its logits (one row, vocabulary-sized). The row is
  // modified in place (penalties, then temperature); the filters work on a side list and do not
  // write back.
  //
  // Order (vLLM): repetition penalty -> frequency and presence penalties -> greedy: argmax (lowest
  // id on ties) | temperature -> top-k -> top-p -> min-p -> draw from the softmax of what is left,
  // walking the kept tokens in id order (so the draw is continuous in the probabilities).
  // NaN logits count as -inf. If no token has a finite logit, the answer is the lowest id.
  //
  // History contract (so a step costs O(vocab + new tokens), not O(history)):
  //  - prompt_ids is read once, at the first call that needs it (repetition_penalty != 1), and
  //    must not change afterwards.
  //  - output_ids is the sequence's generated tokens so far. Between calls it may only grow at the
  //    end (normally by the token this call returns); the sampler folds in the ids it has not seen
  //    yet into per-token counts. If it is shorter than at the previous call, the counts are
  //    rebuilt from it (a restarted sequence). Any other rewrite of the history needs reset().
  // Throws InvalidArgument when a history id is outside [0, logits.size()).
  int32_t sample(std::span<float> logits, std::span<const int32_t> prompt_ids,
                 std::span<const int32_t> output_ids);

  // Forgets the history counts (the RNG state is kept).
  void reset();

  const SamplingParams& params() const { return params_; }
  uint64_t seed() const { return seed_; }

  // Log-probabilities. The engine passes the RAW model logits (before penalties and temperature;
  // vLLM's default "raw_logprobs"), i.e. it calls these before sample(), which rewrites logits.
  // out[i] = logits[i] - logsumexp(logits); NaN counts as -inf. out.size() must be logits.size().
  static void log_softmax(std::span<const float> logits, std::span<float> out);
  // The n most likely tokens with their log-probabilities, most likely first (lowest id first on
  // ties); min(n, logits.size()) entries.
  static std::vector<std::pair<int32_t, float>> top_logprobs(std::span<const float> logits, int n);
  // The log-probability of one token.
  static float token_logprob(std::span<const float> logits, int32_t token);

 private:
  void sync_history(std::span<const int32_t> prompt_ids, std::span<const int32_t> output_ids,
                    size_t vocab);
  void apply_penalties(std::span<float> logits) const;
  int32_t draw(std::span<float> logits);

  SamplingParams params_;
  uint64_t seed_;
  std::mt19937_64 rng_;
  bool track_prompt_ = false;  // repetition_penalty != 1
  bool track_output_ = false;  // any penalty active
  bool prompt_seen_ = false;
  std::vector<int32_t> prompt_tokens_;               // distinct prompt ids, sorted
  std::unordered_map<int32_t, int32_t> out_counts_;  // output id -> occurrences
  size_t outputs_seen_ = 0;
  std::vector<std::pair<float, int32_t>> candidates_;  // scratch
};

}  // namespace pmkv
