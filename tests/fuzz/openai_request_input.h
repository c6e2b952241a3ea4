#pragma once
// One input for the OpenAI request parser, shared by the libFuzzer target and the corpus replay.
// Byte 0 picks the endpoint (even: /v1/completions, odd: /v1/chat/completions), the rest is the
// body. The HTTP session catches only http::ApiException around parse_*_request and
// to_engine_requests: anything else escaping them leaves an IO thread's handler, which ends the
// process. So an input must be accepted or rejected with an ApiException; the engine's own check
// of what was accepted (SamplingParams::validate) may add an InvalidArgument.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>

#include "engine/tokenizer/tokenizer.h"
#include "server/chat/chat_prompt.h"
#include "server/http/openai_request.h"

namespace pmkv::fuzz {

// A served model as the parser sees it: a real tokenizer and chat template (ChatML), a 512-token
// context, n at most 8.
struct RequestModel {
  explicit RequestModel(const std::filesystem::path& model_dir);
  Tokenizer tokenizer;
  chat::ChatPrompt chat;
  http::ModelInfo info;
};

// models/pmkv-ref of this checkout (its tokenizer files are tracked), or $PMKV_FUZZ_MODEL.
std::filesystem::path default_request_model_dir();

enum class RequestOutcome { kAccepted, kRejected };

// Throws whatever the parser throws besides ApiException (and InvalidArgument from validate()).
RequestOutcome run_request_input(std::span<const uint8_t> input, const http::ModelInfo& model);

}  // namespace pmkv::fuzz
