// CompletionJob (SSE chunks, final bodies, usage, logprobs, errors) and the Prometheus text.
#include <catch2/catch.hpp>

#include <sstream>
#include <string>
#include <vector>

#include "server/http/completion_job.h"
#include "server/http/metrics_text.h"

using namespace pmkv;
using namespace pmkv::http;

namespace {

ApiRequest request(Endpoint endpoint, bool stream, int32_t n = 1, int32_t logprobs = -1) {
  ApiRequest r;
  r.endpoint = endpoint;
  r.stream = stream;
  r.include_usage = stream;
  r.n = n;
  r.logprobs = logprobs;
  r.prompts = {{1, 2, 3}};
  return r;
}

StreamUpdate tokens(std::vector<std::string> texts, int32_t done_so_far) {
  StreamUpdate u;
  for (size_t i = 0; i < texts.size(); ++i) {
    TokenEvent t;
    t.token_id = static_cast<int32_t>(10 + i);
    t.text = texts[i];
    t.logprob = -0.5f;
    t.top_logprobs = {{static_cast<int32_t>(10 + i), -0.5f}, {99, -1.5f}};
    u.tokens.push_back(std::move(t));
  }
  u.prompt_tokens = 3;
  u.completion_tokens = done_so_far + static_cast<int32_t>(texts.size());
  return u;
}

StreamUpdate finished(StreamUpdate u, FinishReason reason) {
  u.end = StreamEnd::kFinished;
  u.finish_reason = reason;
  return u;
}

// The JSON payloads of "data: ..." events (not [DONE]).
std::vector<Json> events(const std::string& sse) {
  std::vector<Json> out;
  std::istringstream in(sse);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("data: ", 0) != 0 || line == "data: [DONE]") continue;
    out.push_back(Json::parse(line.substr(6)));
  }
  return out;
}

}  // namespace

TEST_CASE("chat stream: role chunk, content deltas, finish, usage and [DONE]", "[server]") {
  CompletionJob job(request(Endpoint::kChat, true), "chatcmpl-1", "m", 7, nullptr);
  std::string sse = job.apply(0, tokens({"Hel", "lo"}, 0));
  CHECK(job.emitted());
  sse += job.apply(0, finished(tokens({"!"}, 2), FinishReason::kStop));
  REQUIRE(job.done());
  sse += job.stream_tail();
  CHECK(sse.size() > 14);
  CHECK(sse.substr(sse.size() - 14) == "data: [DONE]\n\n");
  const auto ev = events(sse);
  REQUIRE(ev.size() == 4);
  CHECK(ev[0]["object"] == "chat.completion.chunk");
  CHECK(ev[0]["choices"][0]["delta"] == Json{{"role", "assistant"}, {"content", ""}});
  CHECK(ev[1]["choices"][0]["delta"]["content"] == "Hello");
  CHECK(ev[1]["choices"][0]["finish_reason"].is_null());
  CHECK(ev[2]["choices"][0]["delta"]["content"] == "!");
  CHECK(ev[2]["choices"][0]["finish_reason"] == "stop");
  CHECK(ev[3]["choices"].empty());
  CHECK(ev[3]["usage"] ==
        Json{{"prompt_tokens", 3}, {"completion_tokens", 3}, {"total_tokens", 6}});
  CHECK(ev[1]["usage"].is_null());  // include_usage: null on every other chunk
}

TEST_CASE("completions non-stream: text, finish_reason, usage and logprobs", "[server]") {
  CompletionJob job(request(Endpoint::kCompletions, false, 2, 1), "cmpl-1", "m", 7, nullptr);
  CHECK(job.apply(0, tokens({"a", "bc"}, 0)).empty());
  job.apply(1, finished(tokens({"x"}, 0), FinishReason::kLength));
  CHECK_FALSE(job.done());
  job.apply(
      0, finished(StreamUpdate{.prompt_tokens = 3, .completion_tokens = 2}, FinishReason::kStop));
  REQUIRE(job.done());
  const Json body = Json::parse(job.response_body());
  CHECK(body["object"] == "text_completion");
  CHECK(body["choices"][0]["text"] == "abc");
  CHECK(body["choices"][0]["finish_reason"] == "stop");
  CHECK(body["choices"][1]["text"] == "x");
  CHECK(body["choices"][1]["finish_reason"] == "length");
  CHECK(body["usage"] == Json{{"prompt_tokens", 3}, {"completion_tokens", 3}, {"total_tokens", 6}});
  const Json& lp = body["choices"][0]["logprobs"];
  CHECK(lp["token_logprobs"] == Json{-0.5, -0.5});
  CHECK(lp["text_offset"] == Json{0, 1});
  CHECK(lp["top_logprobs"].size() == 2);
}

TEST_CASE("chat non-stream logprobs have OpenAI's content shape", "[server]") {
  CompletionJob job(request(Endpoint::kChat, false, 1, 2), "c", "m", 7, nullptr);
  job.apply(0, finished(tokens({"hi"}, 0), FinishReason::kLength));
  const Json body = Json::parse(job.response_body());
  CHECK(body["choices"][0]["message"] == Json{{"role", "assistant"}, {"content", "hi"}});
  const Json& content = body["choices"][0]["logprobs"]["content"];
  REQUIRE(content.size() == 1);
  CHECK(content[0]["logprob"] == -0.5);
  CHECK(content[0]["top_logprobs"].size() == 2);
  CHECK(content[0].contains("bytes"));
}

TEST_CASE("a stream that fails before any byte went out is an HTTP error", "[server]") {
  CompletionJob job(request(Endpoint::kChat, true), "c", "m", 7, nullptr);
  StreamUpdate u;
  u.end = StreamEnd::kRejected;
  u.error = "the prompt needs 900 KV pages; the pool has 100";
  CHECK(job.apply(0, u).empty());
  CHECK_FALSE(job.emitted());
  REQUIRE(job.error().has_value());
  CHECK(job.error()->status == 400);
  CHECK(job.error()->message == u.error);
}

TEST_CASE("a stream that fails after bytes went out ends with an error event", "[server]") {
  CompletionJob job(request(Endpoint::kCompletions, true, 2), "c", "m", 7, nullptr);
  CHECK_FALSE(job.apply(0, tokens({"a"}, 0)).empty());
  StreamUpdate u;
  u.end = StreamEnd::kShutdown;
  const auto ev = events(job.apply(1, u));
  REQUIRE(ev.size() == 1);
  CHECK(ev[0]["error"]["code"] == "shutting_down");
  StreamUpdate cancelled;
  cancelled.end = StreamEnd::kCancelled;
  CHECK(job.apply(0, cancelled).empty());
  CHECK(job.done());
  CHECK(job.stream_tail() == "data: [DONE]\n\n");
}

TEST_CASE("metrics are Prometheus text with HELP, TYPE and cumulative buckets", "[server]") {
  EngineStats s;
  s.requests_running = 2;
  s.kv.pages_used = 5;
  s.kv.pages_total = 100;
  s.kv.tokens_by_bits = {10, 20, 30, 40};
  s.time_to_first_token = {{0.1, 1.0}, {1, 2, 3}, 7.5, 6};
  const std::string text = format_metrics(s, {.requests_total = 3});
  CHECK_THAT(text, Catch::Contains("# HELP pmkv_requests_running "));
  CHECK_THAT(text,
             Catch::Contains("# TYPE pmkv_requests_running gauge\npmkv_requests_running 2\n"));
  CHECK_THAT(text, Catch::Contains("pmkv_kv_pool_pages_used 5\n"));
  CHECK_THAT(text, Catch::Contains("pmkv_kv_tokens{bits=\"4\"} 30\n"));
  CHECK_THAT(text, Catch::Contains("# TYPE pmkv_preemptions_total counter\n"));
  CHECK_THAT(text, Catch::Contains("# TYPE pmkv_time_to_first_token_seconds histogram\n"));
  CHECK_THAT(text, Catch::Contains("pmkv_time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n"
                                   "pmkv_time_to_first_token_seconds_bucket{le=\"1\"} 3\n"
                                   "pmkv_time_to_first_token_seconds_bucket{le=\"+Inf\"} 6\n"
                                   "pmkv_time_to_first_token_seconds_sum 7.5\n"
                                   "pmkv_time_to_first_token_seconds_count 6\n"));
}
