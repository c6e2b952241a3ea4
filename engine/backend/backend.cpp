#include "engine/backend/backend.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pmkv {

void Backend::forward_sample(const StepBatch&, std::span<const DeviceSampling>,
                             std::span<int32_t>) {
  throw std::logic_error("backend " + name() + " does not sample on the device");
}

void Backend::launch_sample(const StepBatch& batch, std::span<const DeviceSampling> rows) {
  std::vector<int32_t> tokens(rows.size());
  if (batch.token_src.empty()) {
    forward_sample(batch, rows, tokens);
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
    forward_sample(b, rows, tokens);
  }
  last_sampled_ = tokens;
  in_flight_.push_back(std::move(tokens));
}

void Backend::wait_sampled(std::span<int32_t> tokens) {
  if (in_flight_.empty()) throw std::logic_error("wait_sampled: no step in flight");
  std::vector<int32_t> t = std::move(in_flight_.front());
  in_flight_.pop_front();
  if (t.size() != tokens.size()) {
    throw std::invalid_argument("wait_sampled: the step sampled " + std::to_string(t.size()) +
                                " rows, the caller expects " + std::to_string(tokens.size()));
  }
  std::copy(t.begin(), t.end(), tokens.begin());
}

void Backend::drop_in_flight() noexcept {
  in_flight_.clear();
}

}  // namespace pmkv
