#include "server/http/openai_request.h"

#include <cmath>
#include <limits>

#include "engine/common/error.h"
#include "server/http/json_fields.h"

namespace pmkv::http {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int32_t kMaxLogprobs = 20;
constexpr size_t kMaxStopStrings = 32;

float to_float(double x) {
  if (std::isfinite(x) && std::fabs(x) > std::numeric_limits<float>::max()) {
    return x > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  }
  return static_cast<float>(x);
}

void set_float(const Json& j, std::string_view name, float& out) {
  if (auto v = get_number(j, name)) out = to_float(*v);
}

// 404 when the request names a model this server does not serve.
void check_model(const Json& j, const ModelInfo& m) {
  const auto name = get_string(j, "model");
  if (!name || *name == m.served_name || (!m.alt_name.empty() && *name == m.alt_name)) return;
  throw ApiException(ApiError{.status = 404,
                              .message = "The model `" + *name + "` does not exist; this server " +
                                         "serves `" + m.served_name + "`",
                              .param = "model",
                              .code = "model_not_found"});
}

// Fields OpenAI defines that pmkv accepts only at their neutral values.
void reject_unsupported(const Json& j) {
  auto set = [&](std::string_view name) {
    const auto it = j.find(name);
    return it != j.end() && !it->is_null() && !(it->is_array() && it->empty()) &&
           !(it->is_object() && it->empty()) && !(it->is_boolean() && !it->get<bool>()) &&
           !(it->is_string() && it->get<std::string>().empty());
  };
  for (std::string_view name :
       {"echo", "suffix", "logit_bias", "tools", "functions", "audio", "prediction"}) {
    if (set(name))
      throw bad_request("'" + std::string(name) + "' is not supported", std::string(name));
  }
  if (set("best_of") &&
      get_int(j, "best_of", 1, kInt32Max) != get_int(j, "n", 1, kInt32Max).value_or(1)) {
    throw bad_request("'best_of' is not supported (it must equal n)", "best_of");
  }
  for (std::string_view name : {"tool_choice", "function_call"}) {
    if (!set(name)) continue;
    const auto v = get_string(j, name);  // an object (a forced function) is a type error
    if (*v != "none" && *v != "auto") {
      throw bad_request("'" + std::string(name) + "' must be \"none\" or \"auto\"",
                        std::string(name));
    }
  }
  if (set("response_format")) {
    const Json& rf = j["response_format"];
    if (!rf.is_object() || rf.value("type", Json()) != "text") {
      throw bad_request("'response_format' supports only {\"type\": \"text\"}", "response_format");
    }
  }
}

void parse_stream_options(const Json& j, ApiRequest& r) {
  r.stream = get_bool(j, "stream").value_or(false);
  const auto it = j.find("stream_options");
  if (it == j.end() || it->is_null()) return;
  if (!it->is_object()) throw bad_request("'stream_options' must be an object", "stream_options");
  if (!r.stream) {
    throw bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options");
  }
  reject_unknown_fields(*it, {"include_usage"}, "stream_options");
  r.include_usage = get_bool(*it, "include_usage").value_or(false);
}

void parse_sampling(const Json& j, SamplingParams& p) {
  set_float(j, "temperature", p.temperature);
  set_float(j, "top_p", p.top_p);
  set_float(j, "min_p", p.min_p);
  set_float(j, "repetition_penalty", p.repetition_penalty);
  set_float(j, "presence_penalty", p.presence_penalty);
  set_float(j, "frequency_penalty", p.frequency_penalty);
  if (auto v = get_int(j, "top_k", -1, kInt32Max)) p.top_k = static_cast<int32_t>(*v);
  if (auto v = get_int(j, "seed", kInt64Min, kInt64Max)) p.seed = static_cast<uint64_t>(*v);
  if (auto v = get_string_list(j, "stop")) p.stop = std::move(*v);
  if (p.stop.size() > kMaxStopStrings) {
    throw bad_request("'stop' may hold at most " + std::to_string(kMaxStopStrings) + " strings",
                      "stop");
  }
  if (auto v = get_int_list(j, "stop_token_ids", 0, kInt32Max)) p.stop_token_ids = std::move(*v);
  p.ignore_eos = get_bool(j, "ignore_eos").value_or(false);
  p.include_stop_str_in_output = get_bool(j, "include_stop_str_in_output").value_or(false);
  p.max_tokens = 1;  // validated once resolved; validate() the rest now
  try {
    p.validate();
  } catch (const InvalidArgument& e) {
    throw bad_request(e.what());
  }
  p.max_tokens = 0;
}

// The fields both endpoints share.
void parse_common(const Json& j, const ModelInfo& m, ApiRequest& r) {
  check_model(j, m);
  reject_unsupported(j);
  parse_stream_options(j, r);
  r.n = static_cast<int32_t>(get_int(j, "n", 1, kInt32Max).value_or(1));
  if (r.n > m.max_n) {
    throw bad_request("'n' must be at most " + std::to_string(m.max_n) + " on this server, got " +
                          std::to_string(r.n),
                      "n");
  }
  parse_sampling(j, r.params);
  auto max_tokens = get_int(j, "max_tokens", 1, kInt32Max);
  if (r.endpoint == Endpoint::kChat) {
    if (auto v = get_int(j, "max_completion_tokens", 1, kInt32Max)) max_tokens = v;
  }
  r.max_tokens_given = max_tokens.has_value();
  r.params.max_tokens = static_cast<int32_t>(max_tokens.value_or(0));
}

std::vector<int32_t> encode_text(const ModelInfo& m, const std::string& text) {
  if (m.tokenizer == nullptr) {
    throw bad_request("this model has no tokenizer (tokenizer.model): send the prompt as token ids",
                      "prompt");
  }
  try {
    return m.tokenizer->encode_prompt(text);
  } catch (const InvalidArgument& e) {
    throw bad_request(std::string("cannot tokenize the prompt: ") + e.what(), "prompt");
  }
}

std::vector<int32_t> ids_of(const Json& arr, const ModelInfo& m) {
  const int64_t max_id = m.vocab_size > 0 ? m.vocab_size - 1 : kInt32Max;
  std::vector<int32_t> ids;
  for (const Json& e : arr)
    ids.push_back(static_cast<int32_t>(as_int(e, "prompt", 0, max_id)));
  return ids;
}

std::vector<std::vector<int32_t>> parse_prompts(const Json& j, const ModelInfo& m) {
  const auto it = j.find("prompt");
  if (it == j.end() || it->is_null()) throw bad_request("'prompt' is required", "prompt");
  const Json& p = *it;
  constexpr const char* kShape =
      "a string, an array of strings, an array of token ids or an array of token id arrays";
  if (p.is_string()) return {encode_text(m, p.get<std::string>())};
  if (!p.is_array())
    throw bad_request("'prompt' must be " + std::string(kShape) + ", got " + type_name(p),
                      "prompt");
  if (p.empty()) throw bad_request("'prompt' must not be empty", "prompt");
  if (p.front().is_number()) return {ids_of(p, m)};
  std::vector<std::vector<int32_t>> out;
  for (const Json& e : p) {
    if (e.is_string()) {
      out.push_back(encode_text(m, e.get<std::string>()));
    } else if (e.is_array() && !e.empty()) {
      out.push_back(ids_of(e, m));
    } else {
      throw bad_request("'prompt' must be " + std::string(kShape), "prompt");
    }
  }
  return out;
}

std::string message_content(const Json& msg, const std::string& where) {
  const auto it = msg.find("content");
  if (it == msg.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array()) {
    throw bad_request(
        where + ".content must be a string or an array of text parts, got " + type_name(*it),
        "messages");
  }
  std::string text;
  for (const Json& part : *it) {
    if (!part.is_object() || part.value("type", Json()) != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      throw bad_request(
          where + ".content: only {\"type\": \"text\", \"text\": ...} parts are " + "supported",
          "messages");
    }
    if (!text.empty()) text += "\n";
    text += part["text"].get<std::string>();
  }
  return text;
}

std::vector<chat::ChatMessage> parse_messages(const Json& j) {
  const auto it = j.find("messages");
  if (it == j.end() || it->is_null()) throw bad_request("'messages' is required", "messages");
  if (!it->is_array())
    throw bad_request("'messages' must be an array, got " + type_name(*it), "messages");
  if (it->empty()) throw bad_request("'messages' must not be empty", "messages");
  std::vector<chat::ChatMessage> out;
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& msg = (*it)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) throw bad_request(where + " must be an object", "messages");
    Json checked = msg;
    for (const char* key : {"tool_calls", "function_call", "refusal", "audio"}) {
      if (checked.contains(key) && (checked[key].is_null() || checked[key].empty()))
        checked.erase(key);
    }
    reject_unknown_fields(checked, {"role", "content", "name"}, where);
    const auto role = get_string(msg, "role");
    if (!role) throw bad_request(where + ".role is required", "messages");
    (void)get_string(msg, "name");
    out.push_back({*role, message_content(msg, where)});
  }
  return out;
}

}  // namespace

ApiRequest parse_completion_request(std::string_view body, const ModelInfo& model) {
  const Json j = parse_body(body);
  reject_unknown_fields(j, {"model",
                            "prompt",
                            "stream",
                            "stream_options",
                            "n",
                            "max_tokens",
                            "temperature",
                            "top_p",
                            "top_k",
                            "min_p",
                            "seed",
                            "stop",
                            "presence_penalty",
                            "frequency_penalty",
                            "repetition_penalty",
                            "logprobs",
                            "ignore_eos",
                            "stop_token_ids",
                            "include_stop_str_in_output",
                            "user",
                            "logit_bias",
                            "best_of",
                            "echo",
                            "suffix"});
  ApiRequest r;
  r.endpoint = Endpoint::kCompletions;
  parse_common(j, model, r);
  if (auto v = get_int(j, "logprobs", 0, kMaxLogprobs)) r.logprobs = static_cast<int32_t>(*v);
  (void)get_string(j, "user");
  r.prompts = parse_prompts(j, model);
  if (r.num_choices() > model.max_n) {
    throw bad_request("this request asks for " + std::to_string(r.prompts.size()) +
                          " prompts x n=" + std::to_string(r.n) + " choices; at most " +
                          std::to_string(model.max_n) + " per request",
                      "prompt");
  }
  return r;
}

ApiRequest parse_chat_request(std::string_view body, const ModelInfo& model) {
  const Json j = parse_body(body);
  reject_unknown_fields(j, {"model",
                            "messages",
                            "stream",
                            "stream_options",
                            "n",
                            "max_tokens",
                            "max_completion_tokens",
                            "temperature",
                            "top_p",
                            "top_k",
                            "min_p",
                            "seed",
                            "stop",
                            "presence_penalty",
                            "frequency_penalty",
                            "repetition_penalty",
                            "logprobs",
                            "top_logprobs",
                            "ignore_eos",
                            "stop_token_ids",
                            "include_stop_str_in_output",
                            "user",
                            "logit_bias",
                            "tools",
                            "tool_choice",
                            "functions",
                            "function_call",
                            "parallel_tool_calls",
                            "response_format",
                            "store",
                            "metadata",
                            "service_tier",
                            "modalities",
                            "audio",
                            "prediction",
                            "add_generation_prompt"});
  ApiRequest r;
  r.endpoint = Endpoint::kChat;
  parse_common(j, model, r);
  const bool logprobs = get_bool(j, "logprobs").value_or(false);
  const auto top = get_int(j, "top_logprobs", 0, kMaxLogprobs);
  if (top && !logprobs)
    throw bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs");
  if (logprobs) r.logprobs = static_cast<int32_t>(top.value_or(0));
  (void)get_string(j, "user");
  (void)get_bool(j, "parallel_tool_calls");
  const bool add_gen = get_bool(j, "add_generation_prompt").value_or(true);
  const std::vector<chat::ChatMessage> messages = parse_messages(j);
  if (model.chat == nullptr) throw bad_request("this server has no chat template", "messages");
  try {
    r.prompts = {model.chat->encode(messages, add_gen)};
  } catch (const InvalidArgument& e) {
    throw bad_request(e.what(), "messages");
  }
  return r;
}

std::vector<EngineRequest> to_engine_requests(const ApiRequest& request, const ModelInfo& model,
                                              std::string_view request_id) {
  const char* what = request.endpoint == Endpoint::kChat ? "messages" : "prompt";
  std::vector<EngineRequest> out;
  for (size_t p = 0; p < request.prompts.size(); ++p) {
    const int64_t len = static_cast<int64_t>(request.prompts[p].size());
    const int64_t room = model.max_model_len - len;
    if (room < 1) {
      throw bad_request("the prompt is " + std::to_string(len) + " tokens long; this model's " +
                            "context is " + std::to_string(model.max_model_len) +
                            " tokens, which leaves no room to generate",
                        what);
    }
    SamplingParams params = request.params;
    if (!request.max_tokens_given) {
      params.max_tokens = static_cast<int32_t>(
          request.endpoint == Endpoint::kChat ? room : std::min<int64_t>(16, room));
    } else if (params.max_tokens > room) {
      throw bad_request("this model's maximum context length is " +
                            std::to_string(model.max_model_len) + " tokens; you requested " +
                            std::to_string(len + params.max_tokens) + " tokens (" +
                            std::to_string(len) + " in the " + what + ", " +
                            std::to_string(params.max_tokens) + " for the completion)",
                        "max_tokens");
    }
    for (int32_t i = 0; i < request.n; ++i) {
      EngineRequest e;
      e.request_id = std::string(request_id) + "-" + std::to_string(out.size());
      e.prompt_ids = request.prompts[p];
      e.params = params;
      if (params.seed) e.params.seed = *params.seed + static_cast<uint64_t>(i);
      e.logprobs = request.logprobs;
      out.push_back(std::move(e));
    }
  }
  return out;
}

}  // namespace pmkv::http
