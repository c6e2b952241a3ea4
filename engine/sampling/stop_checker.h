#pragma once
// When a sequence stops, and which text a streaming client may see: stop strings across chunk
// boundaries (with hold-back so that no client ever sees part of a stop string), EOS and extra
// stop tokens, max_tokens. Works on the detokenizer's output; knows nothing of tokenizers.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sampling/sampling_params.h"

namespace pmkv {

enum class FinishReason { kStop, kLength };

// "stop" / "length", as in OpenAI's finish_reason.
std::string_view to_string(FinishReason reason);

struct StopUpdate {
  std::string text;                        // text the client may see now (possibly empty)
  std::optional<FinishReason> finish;      // set once the sequence is over
  std::optional<std::string> stop_string;  // the stop string that ended it, if one did
  std::optional<int32_t> stop_token;       // the stop_token_ids entry that ended it, if one did
                                           // (an EOS id leaves both empty, as vLLM's stop_reason)
  bool finished() const { return finish.has_value(); }
};

// Per sequence. Rules, in vLLM's order, for each generated token:
//  1. an EOS id (unless ignore_eos) or a stop_token_ids entry: finish "stop". The token's own text
//     is dropped unless include_stop_str_in_output; text held back earlier is released.
//  2. stop strings, searched in the text not yet released plus the token's text: the occurrence
//     that ENDS first wins (what a character-by-character stream would hit first; among those
//     ending at the same place the longest); the released text stops before it, or after it with
//     include_stop_str_in_output; finish "stop". The result depends only on the concatenated
//     text, never on how it was chunked.
//  3. the max_tokens-th token: finish "length", all held text released.
//  Otherwise the longest tail of the text that is a proper prefix of some stop string is held
//  back and the rest released. Released text is cut only at character boundaries when the text and
//  the stop strings are valid UTF-8 (a stop string starts with a lead byte).
class StopChecker {
 public:
  // eos_ids: the model's EOS ids (Tokenizer::eos_ids()).
  StopChecker(const SamplingParams& params, std::span<const int32_t> eos_ids);

  // One generated token and the text the detokenizer completed with it. The detokenizer may hold
  // bytes of an unfinished character; when this token is the last one (tokens_remaining() == 1
  // before the call) pass push(id) + flush() as its text. Throws std::logic_error once finished.
  StopUpdate append(int32_t token_id, std::string_view text);

  // Ends the sequence for a reason outside the checker (context window full: kLength), releasing
  // the held text plus `tail` (the detokenizer's flush()); a stop string completed by `tail` still
  // wins. Throws std::logic_error once finished.
  StopUpdate finish(FinishReason reason, std::string_view tail = {});

  bool finished() const { return finished_; }
  int32_t num_tokens() const { return generated_; }
  int32_t tokens_remaining() const { return max_tokens_ - generated_; }
  // The text held back (a possible start of a stop string).
  const std::string& held_back() const { return held_; }

 private:
  // Searches held_ + text for a stop string; fills `out` and returns true when one is found.
  bool find_stop(const std::string& buffer, StopUpdate& out) const;
  size_t holdback_length(std::string_view buffer) const;

  std::vector<std::string> stop_;
  std::vector<int32_t> eos_ids_;
  std::vector<int32_t> stop_token_ids_;
  bool include_stop_ = false;
  int32_t max_tokens_ = 0;
  size_t max_stop_len_ = 0;
  int32_t generated_ = 0;
  std::string held_;
  bool finished_ = false;
};

}  // namespace pmkv
