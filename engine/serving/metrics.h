#pragma once
// The engine's counters and latency histograms. Updated on the engine thread only; the engine
// copies them into an EngineStats snapshot (under its stats mutex) for other threads.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "engine/serving/serving_engine.h"

namespace pmkv {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

  void observe(double seconds) {
    const auto it = std::lower_bound(bounds_.begin(), bounds_.end(), seconds);
    ++counts_[static_cast<size_t>(it - bounds_.begin())];
    sum_ += seconds;
    ++count_;
  }
  HistogramSnapshot snapshot() const { return {bounds_, counts_, sum_, count_}; }

  // Prometheus' default buckets (client libraries' DefBuckets): request latency, TTFT.
  static std::vector<double> default_buckets() {
    return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
  }
  // Finer buckets for the gap between two tokens of one stream.
  static std::vector<double> token_buckets() {
    return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
  }

 private:
  std::vector<double> bounds_;    // upper bounds (inclusive, le), ascending
  std::vector<uint64_t> counts_;  // per bucket; the last one is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

struct EngineMetrics {
  Histogram time_to_first_token{Histogram::default_buckets()};
  Histogram inter_token_latency{Histogram::token_buckets()};
  Histogram request_latency{Histogram::default_buckets()};  // submit to the end, finished ones
  uint64_t finished = 0;
  uint64_t cancelled = 0;
  uint64_t rejected = 0;
  uint64_t failed = 0;  // ended by an error inside a step
  uint64_t prompt_tokens = 0;
  uint64_t generation_tokens = 0;
  uint64_t steps = 0;
  uint64_t discarded_tokens = 0;  // sampled for sequences that had ended (steps run ahead)
  // The engine thread's time waiting for work (its time blocked on the device is the backend's
  // Backend::device_wait_seconds()); the rest is host work.
  double idle_seconds = 0;
};

}  // namespace pmkv
