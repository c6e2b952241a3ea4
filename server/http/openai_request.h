#pragma once
// OpenAI request bodies (/v1/completions, /v1/chat/completions) -> validated, tokenized requests
// for the engine. All JSON stops here: what goes on is EngineRequest (plain structs).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sampling/sampling_params.h"
#include "engine/serving/request.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/chat/chat_prompt.h"

namespace pmkv::http {

enum class Endpoint { kCompletions, kChat };

// What parsing needs to know about the served model.
struct ModelInfo {
  const Tokenizer* tokenizer = nullptr;    // null: prompts must be token ids, no chat
  const chat::ChatPrompt* chat = nullptr;  // the model's chat template
  std::string served_name;                 // requests naming another model get 404
  std::string alt_name;                    // also accepted (the model directory's name)
  int32_t vocab_size = 0;
  int32_t max_model_len = 0;
  int32_t max_n = 16;  // choices per request at most
};

// Parameters of an OpenAI request that shape the response (the rest goes into the engine).
struct ApiRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  int32_t n = 1;
  // -1: none; chat: top_logprobs when logprobs is true; completions: the logprobs count.
  int32_t logprobs = -1;
  std::vector<std::vector<int32_t>> prompts;  // one per prompt (a completions batch has several)
  SamplingParams params;                      // max_tokens left at 0 when the request has none
  bool max_tokens_given = false;
  // Choice index = prompt index * n + sample index.
  int32_t num_choices() const { return static_cast<int32_t>(prompts.size()) * n; }
};

// Throw ApiException (400 or 404) with a message naming the offending field.
ApiRequest parse_completion_request(std::string_view body, const ModelInfo& model);
ApiRequest parse_chat_request(std::string_view body, const ModelInfo& model);

// The engine requests of every choice, in choice order: max_tokens resolved against the context
// (absent: the rest of the context for chat, 16 for completions, as OpenAI), seeds spread as
// seed + sample index. Throws ApiException when a prompt does not fit the context.
std::vector<EngineRequest> to_engine_requests(const ApiRequest& request, const ModelInfo& model,
                                              std::string_view request_id);

}  // namespace pmkv::http
