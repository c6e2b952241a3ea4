#pragma once
// CompletionJob: one OpenAI request's choices while their engine streams run, and everything the
// client sees of them: SSE chunks (stream) or the final JSON (non-stream), usage, logprobs in
// OpenAI's two shapes (chat and completions), and the error a stream ended with. Owned by one
// connection; not thread-safe. Knows nothing of sockets.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/serving/request.h"
#include "engine/tokenizer/tokenizer.h"
#include "server/http/api_error.h"
#include "server/http/json_fields.h"
#include "server/http/openai_request.h"

namespace pmkv::http {

class CompletionJob {
 public:
  // `prompt_lengths`: tokens of each prompt (choice c belongs to prompt c / n).
  CompletionJob(const ApiRequest& request, std::string id, std::string model, int64_t created,
                const Tokenizer* tokenizer);

  int32_t num_choices() const { return static_cast<int32_t>(choices_.size()); }
  bool stream() const { return stream_; }

  // Applies one update of choice `index`'s engine stream. In stream mode returns the SSE bytes it
  // releases (possibly empty): data chunks, or an error event when the stream failed after bytes
  // had gone out. Updates after an error are ignored.
  std::string apply(int32_t index, const StreamUpdate& update);

  bool done() const { return ended_ == num_choices(); }
  // Whether any SSE bytes have been returned (the HTTP status is then 200, whatever happens).
  bool emitted() const { return emitted_; }
  // The first failure of a stream (never admitted, server shutdown, deadline).
  const std::optional<ApiError>& error() const { return error_; }

  // Stream mode, once done(): the usage chunk (stream_options.include_usage) and "data: [DONE]".
  std::string stream_tail() const;
  // Non-stream mode, once done() without error(): the response body.
  std::string response_body() const;

  int64_t prompt_tokens() const;
  int64_t completion_tokens() const;

 private:
  struct Choice {
    std::string text;
    Json logprobs;  // chat: the content array; completions: the four parallel arrays
    std::optional<std::string> finish_reason;
    int64_t text_offset = 0;  // completions: code points so far
    int32_t prompt_tokens = 0;
    int32_t completion_tokens = 0;
    bool started = false;  // chat stream: the role chunk went out
    bool ended = false;
  };
  void record_end(Choice& c, const StreamUpdate& u);
  Json logprob_delta(Choice& c, const std::vector<TokenEvent>& tokens);
  Json chat_logprob(const TokenEvent& t) const;
  void add_completion_logprobs(Json& lp, Choice& c, const std::vector<TokenEvent>& tokens) const;
  std::string stream_chunk(int32_t index, Choice& c, const StreamUpdate& u);
  Json chunk_envelope() const;
  Json usage() const;

  Endpoint endpoint_;
  bool stream_;
  bool include_usage_;
  int32_t n_;
  int32_t logprobs_;
  std::string id_;
  std::string model_;
  int64_t created_;
  const Tokenizer* tokenizer_;
  std::vector<Choice> choices_;
  int32_t ended_ = 0;
  bool emitted_ = false;
  std::optional<ApiError> error_;
};

// The text a token stands for, as logprobs report it ("▁" as a space, byte pieces as their byte).
std::string token_text(const Tokenizer* tokenizer, int32_t id);

// "data: <json>\n\n".
std::string sse_data(const Json& payload);

}  // namespace pmkv::http
