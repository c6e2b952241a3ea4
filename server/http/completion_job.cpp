#include "server/http/completion_job.h"

#include <cmath>

namespace pmkv::http {
namespace {

constexpr std::string_view kSpacePiece = "\xE2\x96\x81";  // "▁"

double finite_logprob(float lp) {
  return std::isfinite(lp) ? lp : -9999.0;
}

Json bytes_of(const std::string& s) {
  Json out = Json::array();
  for (unsigned char c : s)
    out.push_back(static_cast<int>(c));
  return out;
}

int64_t code_points(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s)
    n += (c & 0xC0) != 0x80;
  return n;
}

ApiError end_error(const StreamUpdate& u) {
  switch (*u.end) {
    case StreamEnd::kRejected:
      return ApiError{.status = 400,
                      .message = u.error.empty() ? "the request cannot be served" : u.error,
                      .code = "request_rejected"};
    case StreamEnd::kShutdown:
      return ApiError{.status = 503,
                      .message = u.error.empty() ? "the server is shutting down" : u.error,
                      .type = "server_error",
                      .code = "shutting_down"};
    case StreamEnd::kError:
      return ApiError{.status = 500,
                      .message = u.error.empty() ? "internal error" : u.error,
                      .type = "server_error",
                      .code = "internal_error"};
    default:
      return ApiError{.status = 408,
                      .message = "the request was cancelled before it finished (request timeout)",
                      .type = "timeout_error",
                      .code = "request_timeout"};
  }
}

}  // namespace

std::string token_text(const Tokenizer* tokenizer, int32_t id) {
  if (tokenizer == nullptr || id < 0 || id >= tokenizer->vocab_size()) return {};
  if (auto b = tokenizer->byte_value(id)) return std::string(1, static_cast<char>(*b));
  std::string s = tokenizer->piece(id);
  for (size_t pos = s.find(kSpacePiece); pos != std::string::npos; pos = s.find(kSpacePiece, pos)) {
    s.replace(pos, kSpacePiece.size(), " ");
    pos += 1;
  }
  return s;
}

std::string sse_data(const Json& payload) {
  return "data: " + dump(payload) + "\n\n";
}

CompletionJob::CompletionJob(const ApiRequest& request, std::string id, std::string model,
                             int64_t created, const Tokenizer* tokenizer)
    : endpoint_(request.endpoint),
      stream_(request.stream),
      include_usage_(request.include_usage),
      n_(request.n),
      logprobs_(request.logprobs),
      id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      tokenizer_(tokenizer),
      choices_(static_cast<size_t>(request.num_choices())) {
  for (size_t i = 0; i < choices_.size(); ++i) {
    choices_[i].prompt_tokens = static_cast<int32_t>(request.prompts[i / n_].size());
  }
}

int64_t CompletionJob::prompt_tokens() const {
  int64_t total = 0;  // each prompt counts once, whatever n is
  for (size_t i = 0; i < choices_.size(); i += n_)
    total += choices_[i].prompt_tokens;
  return total;
}

int64_t CompletionJob::completion_tokens() const {
  int64_t total = 0;
  for (const Choice& c : choices_)
    total += c.completion_tokens;
  return total;
}

Json CompletionJob::usage() const {
  const int64_t p = prompt_tokens();
  const int64_t c = completion_tokens();
  return {{"prompt_tokens", p}, {"completion_tokens", c}, {"total_tokens", p + c}};
}

Json CompletionJob::chat_logprob(const TokenEvent& t) const {
  const std::string text = token_text(tokenizer_, t.token_id);
  Json top = Json::array();
  for (const auto& [id, lp] : t.top_logprobs) {
    const std::string s = token_text(tokenizer_, id);
    top.push_back({{"token", s}, {"logprob", finite_logprob(lp)}, {"bytes", bytes_of(s)}});
  }
  return {{"token", text},
          {"logprob", finite_logprob(t.logprob.value_or(0.0f))},
          {"bytes", bytes_of(text)},
          {"top_logprobs", std::move(top)}};
}

void CompletionJob::add_completion_logprobs(Json& lp, Choice& c,
                                            const std::vector<TokenEvent>& tokens) const {
  for (const TokenEvent& t : tokens) {
    const std::string text = token_text(tokenizer_, t.token_id);
    const double sampled = finite_logprob(t.logprob.value_or(0.0f));
    Json top = Json::object();
    for (const auto& [id, v] : t.top_logprobs)
      top[token_text(tokenizer_, id)] = finite_logprob(v);
    if (!top.contains(text)) top[text] = sampled;
    lp["tokens"].push_back(text);
    lp["token_logprobs"].push_back(sampled);
    lp["top_logprobs"].push_back(std::move(top));
    lp["text_offset"].push_back(c.text_offset);
    c.text_offset += code_points(t.text);
  }
}

// The logprobs of `tokens` in the endpoint's shape; also appended to the choice (non-stream).
Json CompletionJob::logprob_delta(Choice& c, const std::vector<TokenEvent>& tokens) {
  if (logprobs_ < 0) return nullptr;
  Json delta;
  if (endpoint_ == Endpoint::kChat) {
    delta = {{"content", Json::array()}};
    for (const TokenEvent& t : tokens)
      delta["content"].push_back(chat_logprob(t));
    if (!stream_) {
      if (c.logprobs.is_null()) c.logprobs = {{"content", Json::array()}};
      for (Json& e : delta["content"])
        c.logprobs["content"].push_back(e);
    }
    return delta;
  }
  delta = {{"tokens", Json::array()},
           {"token_logprobs", Json::array()},
           {"top_logprobs", Json::array()},
           {"text_offset", Json::array()}};
  add_completion_logprobs(delta, c, tokens);
  if (!stream_) {
    if (c.logprobs.is_null())
      c.logprobs = delta;
    else
      for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
        for (Json& e : delta[k])
          c.logprobs[k].push_back(e);
  }
  return delta;
}

void CompletionJob::record_end(Choice& c, const StreamUpdate& u) {
  c.ended = true;
  ++ended_;
  if (*u.end == StreamEnd::kFinished) {
    c.finish_reason = std::string(to_string(u.finish_reason.value_or(FinishReason::kLength)));
  } else if (!error_) {
    error_ = end_error(u);
  }
}

Json CompletionJob::chunk_envelope() const {
  Json j = {{"id", id_},
            {"object", endpoint_ == Endpoint::kChat ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", model_}};
  if (include_usage_) j["usage"] = nullptr;
  return j;
}

std::string CompletionJob::stream_chunk(int32_t index, Choice& c, const StreamUpdate& u) {
  std::string text;
  for (const TokenEvent& t : u.tokens)
    text += t.text;
  const Json lp = logprob_delta(c, u.tokens);
  std::string out;
  if (endpoint_ == Endpoint::kChat && !c.started) {
    Json role = chunk_envelope();
    role["choices"] = {{{"index", index},
                        {"delta", {{"role", "assistant"}, {"content", ""}}},
                        {"logprobs", nullptr},
                        {"finish_reason", nullptr}}};
    out += sse_data(role);
  }
  c.started = true;
  const bool finished = c.finish_reason.has_value();
  if (text.empty() && lp.is_null() && !finished) return out;
  Json choice = {{"index", index}, {"logprobs", lp}};
  if (endpoint_ == Endpoint::kChat) {
    choice["delta"] = text.empty() ? Json::object() : Json{{"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["finish_reason"] = finished ? Json(*c.finish_reason) : Json(nullptr);
  Json chunk = chunk_envelope();
  chunk["choices"] = Json::array({std::move(choice)});
  return out + sse_data(chunk);
}

std::string CompletionJob::apply(int32_t index, const StreamUpdate& update) {
  Choice& c = choices_.at(static_cast<size_t>(index));
  if (c.ended) return {};
  c.completion_tokens = update.completion_tokens;
  if (update.prompt_tokens > 0) c.prompt_tokens = update.prompt_tokens;
  if (error_) {  // another choice failed: this one is being cancelled
    if (update.end) record_end(c, update);
    return {};
  }
  if (update.end) record_end(c, update);
  if (error_) {
    if (!stream_ || !emitted_) return {};
    return sse_data({{"error",
                      {{"message", error_->message},
                       {"type", error_->type},
                       {"param", nullptr},
                       {"code", error_->code ? Json(*error_->code) : Json(nullptr)}}}});
  }
  if (!stream_) {
    for (const TokenEvent& t : update.tokens)
      c.text += t.text;
    logprob_delta(c, update.tokens);
    return {};
  }
  std::string out = stream_chunk(index, c, update);
  emitted_ = emitted_ || !out.empty();
  return out;
}

std::string CompletionJob::stream_tail() const {
  std::string out;
  if (include_usage_ && !error_) {
    Json chunk = chunk_envelope();
    chunk["choices"] = Json::array();
    chunk["usage"] = usage();
    out += sse_data(chunk);
  }
  return out + "data: [DONE]\n\n";
}

std::string CompletionJob::response_body() const {
  Json choices = Json::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    Json choice = {{"index", i},
                   {"logprobs", c.logprobs},
                   {"finish_reason", c.finish_reason ? Json(*c.finish_reason) : Json(nullptr)}};
    if (endpoint_ == Endpoint::kChat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    choices.push_back(std::move(choice));
  }
  const bool chat = endpoint_ == Endpoint::kChat;
  return dump({{"id", id_},
               {"object", chat ? "chat.completion" : "text_completion"},
               {"created", created_},
               {"model", model_},
               {"choices", std::move(choices)},
               {"usage", usage()}});
}

}  // namespace pmkv::http
