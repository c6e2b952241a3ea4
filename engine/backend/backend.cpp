#include "engine/backend/backend.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pmkv {

void Backend::forward_sample(const StepBatch&, std::span<const DeviceSampling>, std::span<int32_t>,
                             std::span<TokenLogprobs>) {
  throw std::logic_error("backend " + name() + " does not sample on the device");
}

void Backend::launch_sample(const StepBatch& batch, std::span<const DeviceSampling> rows) {
  Sampled out;
  out.tokens.resize(rows.size());
  if (std::any_of(rows.begin(), rows.end(),
                  [](const DeviceSampling& d) { return d.logprobs >= 0; })) {
    out.logprobs.resize(rows.size());
  }
  if (batch.token_src.empty()) {
    forward_sample(batch, rows, out.tokens, out.logprobs);
  } else {
    // The host has the previous step's tokens already: patch them in (a copy: the batch is the
    // caller's).
    StepBatch b = batch;
    for (size_t r = 0; r < b.token_src.size(); ++r) {
      const int32_t src = b.token_src[r];
      if (src < 0) continue;
      if (static_cast<size_t>(src) >= last_sampled_.size()) {
        throw std::invalid_argument("launch_sample: token_src " + std::to_string(src) +
                                    " is not a row of the previous step");
      }
      b.token_ids[r] = last_sampled_[src];
    }
    forward_sample(b, rows, out.tokens, out.logprobs);
  }
  last_sampled_ = out.tokens;
  in_flight_.push_back(std::move(out));
}

void Backend::wait_sampled(std::span<int32_t> tokens, std::span<TokenLogprobs> logprobs) {
  if (in_flight_.empty()) throw std::logic_error("wait_sampled: no step in flight");
  Sampled t = std::move(in_flight_.front());
  in_flight_.pop_front();
  if (t.tokens.size() != tokens.size() || (!logprobs.empty() && logprobs.size() != tokens.size())) {
    throw std::invalid_argument("wait_sampled: the step sampled " +
                                std::to_string(t.tokens.size()) + " rows, the caller expects " +
                                std::to_string(tokens.size()));
  }
  std::copy(t.tokens.begin(), t.tokens.end(), tokens.begin());
  for (size_t r = 0; r < logprobs.size(); ++r)
    logprobs[r] = r < t.logprobs.size() ? std::move(t.logprobs[r]) : TokenLogprobs{};
}

void Backend::drop_in_flight() noexcept {
  in_flight_.clear();
}

}  // namespace pmkv
