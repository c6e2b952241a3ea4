#pragma once
// OutputProcessor: what happens to a sequence after a step, on the engine thread: sampling from
// its logits row (log-probabilities from the raw logits first), the detokenizer and the stop
// checker, the StreamUpdate pushed to its stream, and the latency metrics.
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/serving/metrics.h"
#include "engine/serving/sequence.h"

namespace pmkv {

class OutputProcessor {
 public:
  using Clock = Sequence::Clock;
  explicit OutputProcessor(EngineMetrics& metrics) : metrics_(metrics) {}

  // The step's result for one sequence: its raw logits row (sampled here, rewritten in place), or
  // the token a backend already sampled on the device (with its log-probabilities when the
  // request asked for them), or neither (a prompt chunk that did not reach the end of the prompt).
  struct Pick {
    std::span<float> logits;
    std::optional<int32_t> token;
    const TokenLogprobs* logprobs = nullptr;  // with `token`, when request.logprobs >= 0
    // >= 0: `token` fills the placeholder at tokens[at] (a step run ahead), else it is appended.
    int32_t at = -1;
    bool empty() const { return logits.empty() && !token; }
  };
  // Takes the next token from `pick`, streams it with its text; true when the sequence finished
  // (the update carried end = kFinished).
  bool on_logits(Sequence& s, Pick pick, Clock::time_point now);
  // Floor action: the KV budget cannot hold `s` even at the floor bits. With a pick (the step
  // sampled it) one last token is streamed first; the stream ends with finish reason "length"
  // (or "stop" when that token stops it). Without one (a prompt chunk) the text still held
  // back has no token to travel with and is dropped.
  void on_floor(Sequence& s, Pick pick, Clock::time_point now);
  // Ends the stream for a reason outside the sequence (kCancelled, kRejected, kShutdown, kError).
  void end(Sequence& s, StreamEnd end, std::string error, Clock::time_point now);

 private:
  TokenEvent sample(Sequence& s, Pick pick);
  std::string detokenize(Sequence& s, int32_t token);
  void push(Sequence& s, StreamUpdate u, Clock::time_point now);

  EngineMetrics& metrics_;
  std::vector<float> raw_;  // scratch: the raw logits row when log-probabilities are asked for
};

}  // namespace pmkv
