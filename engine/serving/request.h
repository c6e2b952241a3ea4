#pragma once
// What frontends hand the serving engine, and what they get back. Plain structs: no JSON, no
// protobuf crosses into the engine (frontends parse, template, tokenize and format).
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/sampling/sampling_params.h"
#include "engine/sampling/stop_checker.h"

namespace pmkv {

struct EngineRequest {
  std::string request_id;  // for logs; unique per submit
  std::vector<int32_t> prompt_ids;
  SamplingParams params;  // validate()d by the frontend (submit re-checks)
  // Log-probabilities: -1 = none; 0 = the sampled token's only; k > 0 = also the top k.
  int32_t logprobs = -1;
  // Absolute deadline: past it the request is cancelled (finish reason "cancelled").
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

struct TokenEvent {
  int32_t token_id = 0;
  std::string text;              // text this token released (possibly empty; UTF-8 complete)
  std::optional<float> logprob;  // when logprobs >= 0
  std::vector<std::pair<int32_t, float>> top_logprobs;  // when logprobs > 0
};

enum class StreamEnd {
  kFinished,   // finish_reason says why (stop / length)
  kCancelled,  // by the client (cancel()) or the deadline
  kRejected,   // never admitted: the prompt cannot fit (error says why)
  kShutdown,   // the server stopped before the request finished
  kError,      // an internal error inside the engine ended it (error says what; a 500)
};

// One batch of news for a request. A stream's updates, concatenated, carry every token once;
// the last one has `end` set.
struct StreamUpdate {
  std::vector<TokenEvent> tokens;
  std::optional<StreamEnd> end;
  std::optional<FinishReason> finish_reason;  // with end == kFinished
  std::string error;                          // with kRejected / kShutdown / kError
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;  // so far
};

}  // namespace pmkv
