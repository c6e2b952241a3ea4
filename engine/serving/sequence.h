#pragma once
// Sequence: the engine thread's state of one request. Counters, not modes (vLLM v1): the KV cache
// holds tokens[0, num_computed); a step computes some of tokens[num_computed, num_tokens()) and,
// when it reaches num_tokens(), samples one more token. A new request is its prompt at
// num_computed 0; decoding is num_tokens() - num_computed == 1; a sequence preempted by recompute
// keeps its tokens (prompt + generated) and starts again at num_computed 0, so the recomputed
// prompt includes what it generated and its sampler, detokenizer and stop checker carry on.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "engine/kv/kv_cache_manager.h"
#include "engine/sampling/sampler.h"
#include "engine/sampling/stop_checker.h"
#include "engine/serving/request.h"
#include "engine/serving/request_stream.h"
#include "engine/tokenizer/detokenizer.h"

namespace pmkv {

struct Sequence {
  using Clock = std::chrono::steady_clock;

  Sequence(kv::SeqId id_, EngineRequest request_, std::shared_ptr<RequestStream> stream_,
           const Tokenizer* tokenizer, std::span<const int32_t> eos_ids, Clock::time_point now)
      : id(id_),
        request(std::move(request_)),
        stream(std::move(stream_)),
        tokens(request.prompt_ids),
        num_prompt(static_cast<int32_t>(request.prompt_ids.size())),
        sampler(request.params),
        stop(request.params, eos_ids),
        arrival(now) {
    if (tokenizer) detok.emplace(*tokenizer, request.prompt_ids);
  }

  kv::SeqId id;
  EngineRequest request;
  std::shared_ptr<RequestStream> stream;
  std::vector<int32_t> tokens;  // prompt ++ generated
  int32_t num_prompt;
  int32_t num_computed = 0;    // tokens in the KV cache
  int64_t reserved_pages = 0;  // guaranteed admission: the worst-case pages held for it
  int32_t num_preemptions = 0;
  Sampler sampler;
  std::optional<IncrementalDetokenizer> detok;
  StopChecker stop;
  Clock::time_point arrival;
  std::optional<Clock::time_point> last_token;  // when the latest token was sent
  // Steps run ahead (engine.async_steps). A step launched with this sequence and not processed yet
  // counts in `in_flight`; the token such a step samples is appended at launch as a placeholder
  // (-1) at tokens[placeholder_at], row placeholder_row of that step's sampled tokens, so that
  // positions and the next step's rows are right before the host knows its value. A sequence
  // whose stream ended while in flight is a zombie: the engine takes it out of the scheduler at
  // once (pages, slot and reservation back) and keeps the object until that step is processed.
  int32_t in_flight = 0;
  int32_t placeholder_at = -1;
  int32_t placeholder_row = -1;
  bool zombie = false;

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
  // Tokens generated and known on the host (a placeholder is not counted).
  int32_t num_generated() const { return num_tokens() - num_prompt - (placeholder_at >= 0); }
  // The length it may reach: prompt + max_tokens (what guaranteed admission reserves for).
  int64_t max_len() const { return int64_t{num_prompt} + request.params.max_tokens; }
  std::span<const int32_t> prompt() const { return std::span(tokens).first(num_prompt); }
  std::span<const int32_t> output() const { return std::span(tokens).subspan(num_prompt); }
};

}  // namespace pmkv
