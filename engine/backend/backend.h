#pragma once
// Backend: runs the model over one StepBatch. One call per step, batch-oriented, so that a GPU
// backend can run a step as one graph. A backend owns the weights and the bytes of the KV pool;
// which pages a sequence owns is decided by the KvCacheManager and arrives in the StepBatch.
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/step_batch.h"
#include "engine/model/model_config.h"
#include "engine/sampling/sampling_params.h"

namespace pmkv {

// What a backend that samples on the device needs to pick one logit row's token: the request's
// parameters, the sequence's seed and how many tokens it has sampled so far (together they fix the
// random draw, so a seeded request gives the same tokens whatever else is in the batch), and the
// history its penalties read.
struct DeviceSampling {
  const SamplingParams* params = nullptr;
  uint64_t seed = 0;
  uint64_t sampled = 0;
  std::span<const int32_t> prompt_ids;
  std::span<const int32_t> output_ids;
  // Steps run ahead (launch_sample): >= 0 when the sequence's newest generated token is not in
  // output_ids because the host has not seen it; it is the step's input token of row
  // last_token_row (a token_src row), and the penalties count it.
  int32_t last_token_row = -1;
  // Log-probabilities to return with the token: -1 none; 0 the token's; n (at most
  // kMaxDeviceLogprobs) also the n most likely tokens'.
  int32_t logprobs = -1;
};

// The most top log-probabilities a row sampled on the device returns (OpenAI's limit); a request
// for more samples on the host.
inline constexpr int32_t kMaxDeviceLogprobs = 20;

// Log-probabilities of a token sampled on the device, from the raw logits (before penalties and
// temperature), as Sampler::token_logprob and Sampler::top_logprobs give them.
struct TokenLogprobs {
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // most likely first, DeviceSampling::logprobs long
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual const ModelConfig& config() const = 0;
  // Runs the step: writes the K/V of every row into its page slot, and the logits of
  // batch.logit_rows into `logits` ([logit_rows.size(), vocab_size] row-major).
  virtual void forward(const StepBatch& batch, std::span<float> logits) = 0;
  // Device-side sampling: a backend that can (samples_on_device()) runs the step and picks one
  // token per logit row (rows[i] for batch.logit_rows[i]) without copying logits back. Same
  // semantics as Sampler, except the random source (seed + sampled count, not Sampler's RNG).
  // `logprobs` is empty (none wanted: the rows' logprobs fields are ignored) or has one entry per
  // row; the entries of rows with logprobs >= 0 are filled, the others cleared.
  virtual bool samples_on_device() const { return false; }
  virtual void forward_sample(const StepBatch& batch, std::span<const DeviceSampling> rows,
                              std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs);
  void forward_sample(const StepBatch& batch, std::span<const DeviceSampling> rows,
                      std::span<int32_t> tokens) {
    forward_sample(batch, rows, tokens, {});
  }
  // forward_sample() split in two, so that the host can build step N + 1 while the device runs
  // step N: launch_sample() starts a step and returns, wait_sampled() returns the tokens of the
  // oldest launched step not waited for yet (in launch order; at most two are in flight, the
  // engine launches N + 1 before it waits for N). Rows with batch.token_src[r] >= 0 take the
  // token the previously launched step sampled in its row token_src[r] (never seen by the host
  // before this launch). `rows` need only live until launch_sample() returns. The base class runs
  // forward_sample() inside launch_sample(); a GPU backend overrides the three.
  // wait_sampled's `logprobs`: as forward_sample's (empty: any the step computed are dropped).
  virtual void launch_sample(const StepBatch& batch, std::span<const DeviceSampling> rows);
  virtual void wait_sampled(std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs);
  void wait_sampled(std::span<int32_t> tokens) { wait_sampled(tokens, {}); }
  // Forgets the steps in flight after an error (waits for the device first; throws nothing).
  virtual void drop_in_flight() noexcept;
  // Time the calling thread has spent blocked on a device (a step's uploads, tokens or logits)
  // since construction. 0 for a backend that computes on the calling thread (the CPU backend:
  // its forward is host work).
  virtual double device_wait_seconds() const { return 0.0; }
  // Memory the backend holds for the weights and for the KV pool (start-up log, metrics).
  virtual int64_t weight_bytes() const = 0;
  virtual int64_t kv_pool_bytes() const = 0;

 private:
  // The base class's launch_sample(): tokens of the steps in flight, oldest first, and of the
  // latest launched one (what token_src refers to).
  struct Sampled {
    std::vector<int32_t> tokens;
    std::vector<TokenLogprobs> logprobs;  // empty when no row asked
  };
  std::deque<Sampled> in_flight_;
  std::vector<int32_t> last_sampled_;
};

}  // namespace pmkv
