// OpenAI request parsing: strict types, unknown fields, ranges, prompts, chat, and the engine
// requests they become. Every failure is an ApiException with a 400 (or 404) and a clear message.
#include <catch2/catch.hpp>

#include <string>

#include "server/http/api_error.h"
#include "server/http/json_fields.h"
#include "server/http/openai_request.h"

using namespace pmkv::http;

namespace {

ModelInfo model() {
  ModelInfo m;
  m.served_name = "stories";
  m.alt_name = "stories260K";
  m.vocab_size = 512;
  m.max_model_len = 64;
  m.max_n = 4;
  return m;
}

// The error a completions body gets ("" when it parses and converts).
ApiError completion_error(const std::string& body) {
  try {
    const ApiRequest r = parse_completion_request(body, model());
    (void)to_engine_requests(r, model(), "id");
  } catch (const ApiException& e) {
    return e.error();
  }
  return ApiError{.status = 0};
}

ApiError chat_error(const std::string& body) {
  try {
    (void)parse_chat_request(body, model());
  } catch (const ApiException& e) {
    return e.error();
  }
  return ApiError{.status = 0};
}

void check_400(const std::string& body, const std::string& fragment) {
  INFO(body);
  const ApiError e = completion_error(body);
  CHECK(e.status == 400);
  CHECK(e.type == "invalid_request_error");
  CHECK_THAT(e.message, Catch::Contains(fragment));
}

}  // namespace

TEST_CASE("completions: token-id prompts become engine requests", "[server]") {
  const ApiRequest r = parse_completion_request(
      R"({"model": "stories", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0.5,
          "top_p": 0.9, "top_k": 7, "min_p": 0.1, "seed": 11, "stop": "x", "n": 2,
          "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
          "logprobs": 3, "ignore_eos": true, "stop_token_ids": [4], "stream": true,
          "stream_options": {"include_usage": true}})",
      model());
  CHECK(r.stream);
  CHECK(r.include_usage);
  CHECK(r.logprobs == 3);
  const auto reqs = to_engine_requests(r, model(), "cmpl-1");
  REQUIRE(reqs.size() == 2);
  for (size_t i = 0; i < 2; ++i) {
    const auto& e = reqs[i];
    CHECK(e.prompt_ids == std::vector<int32_t>{1, 2, 3});
    CHECK(e.params.max_tokens == 5);
    CHECK(e.params.temperature == Approx(0.5f));
    CHECK(e.params.top_p == Approx(0.9f));
    CHECK(e.params.top_k == 7);
    CHECK(e.params.min_p == Approx(0.1f));
    CHECK(e.params.seed == 11 + i);  // request i uses seed + i
    CHECK(e.params.stop == std::vector<std::string>{"x"});
    CHECK(e.params.stop_token_ids == std::vector<int32_t>{4});
    CHECK(e.params.ignore_eos);
    CHECK(e.params.repetition_penalty == Approx(1.1f));
    CHECK(e.logprobs == 3);
  }
  CHECK(reqs[0].request_id != reqs[1].request_id);
}

TEST_CASE("completions: batches, defaults and the model name", "[server]") {
  const ApiRequest r = parse_completion_request(R"({"prompt": [[1, 2], [3]], "n": 2})", model());
  CHECK(r.num_choices() == 4);
  const auto reqs = to_engine_requests(r, model(), "x");
  REQUIRE(reqs.size() == 4);
  CHECK(reqs[2].prompt_ids == std::vector<int32_t>{3});
  CHECK(reqs[0].params.max_tokens == 16);  // OpenAI's completions default
  CHECK(reqs[0].logprobs == -1);
  CHECK(reqs[0].params.temperature == 1.0f);
  // The directory name is accepted as well; others are 404.
  CHECK(completion_error(R"({"model": "stories260K", "prompt": [1]})").status == 0);
  const ApiError e = completion_error(R"({"model": "gpt-4", "prompt": [1]})");
  CHECK(e.status == 404);
  CHECK(e.code == "model_not_found");
  // Explicit nulls are absent fields.
  CHECK(completion_error(R"({"prompt": [1], "temperature": null, "stop": null})").status == 0);
}

TEST_CASE("malformed bodies are 400 with a clear message", "[server]") {
  check_400("{\"prompt\": [1]", "not valid JSON");
  check_400("[1, 2]", "must be a JSON object");
  // The parser throws out_of_range (not parse_error) for a number beyond a double, even when
  // asked not to throw: a 40-byte body ended the server with std::terminate.
  check_400(R"({"prompt": "x", "temperature": 1e400})", "not valid JSON");
  CHECK_THAT(chat_error(R"({"messages": [], "n": -1e999})").message,
             Catch::Contains("number overflow"));
  check_400("{\"prompt\": \"\xC3\x28\"}", "not valid UTF-8");
  check_400("{\"prompt\": \"\xED\xA0\x80\"}", "not valid UTF-8");  // a UTF-16 surrogate
}

TEST_CASE("bodies nested deeper than kMaxJsonDepth are 400 before parsing", "[server]") {
  auto nested = [](size_t levels, const std::string& inner) {
    return std::string(levels, '[') + inner + std::string(levels, ']');
  };
  // A chat message's content 400,000 arrays deep once overflowed the stack (the message's copy).
  const std::string deep =
      R"({"messages": [{"role": "user", "content": )" + nested(400000, "") + "}]}";
  CHECK_THAT(chat_error(deep).message, Catch::Contains("deeper than 64 levels"));
  check_400(R"({"prompt": )" + nested(1000, "1") + "}", "deeper than 64 levels");
  // 64 levels in all (the body's object and 63 arrays) parse; the type check answers.
  check_400(R"({"prompt": )" + nested(kMaxJsonDepth - 1, "1") + "}", "'prompt' must be");
  check_400(R"({"prompt": )" + nested(kMaxJsonDepth, "1") + "}", "deeper than 64 levels");
  // Brackets inside strings (escaped quotes included) do not count.
  check_400(R"({"prompt": ")" + std::string(100, '[') + R"(\"[[[", "n": "x"})", "'n' must be");
}

TEST_CASE("wrong types, unknown fields and bad ranges are 400 naming the field", "[server]") {
  check_400(R"({"prompt": [1], "temperature": "hot"})",
            "'temperature' must be a number, got string");
  check_400(R"({"prompt": [1], "max_tokens": 1.5})", "'max_tokens' must be an integer");
  check_400(R"({"prompt": [1], "stream": 1})", "'stream' must be a boolean");
  check_400(R"({"prompt": [1], "stop": [1]})", "'stop' must be a string or an array of strings");
  check_400(R"({"prompt": [1], "foo": 1, "bar": 2})",
            "Unrecognized request argument(s) supplied: bar, foo");
  check_400(R"({"prompt": [1], "max_tokens": -1})",
            "'max_tokens' must be in [1, 2147483647], got -1");
  check_400(R"({"prompt": [1], "max_tokens": 0})", "'max_tokens' must be in [1,");
  check_400(R"({"prompt": [1], "max_tokens": 1000000000000})", "'max_tokens' must be in [1,");
  check_400(R"({"prompt": [1], "max_tokens": 64})", "maximum context length is 64 tokens");
  check_400(R"({"prompt": [1], "n": 5})", "'n' must be at most 4");
  check_400(R"({"prompt": [[1], [2], [3]], "n": 2})", "at most 4 per request");
  check_400(R"({"prompt": [1], "temperature": -1})", "temperature must be a finite number >= 0");
  check_400(R"({"prompt": [1], "top_p": 0})", "top_p must be in (0, 1]");
  check_400(R"({"prompt": [1], "stop": ""})", "stop[0] is empty");
  check_400(R"({"prompt": [1], "logprobs": 21})", "'logprobs' must be in [0, 20]");
  check_400(R"({"prompt": [1], "echo": true})", "'echo' is not supported");
  check_400(R"({"prompt": [1], "stream_options": {"include_usage": true}})",
            "only allowed when 'stream' is true");
  check_400(R"({"prompt": [1], "stream": true, "stream_options": {"x": 1}})",
            "in stream_options: x");
  check_400(R"({"prompt": [512]})", "'prompt' must be in [0, 511]");
  check_400(R"({"prompt": []})", "'prompt' must not be empty");
  check_400(R"({"max_tokens": 3})", "'prompt' is required");
  check_400(R"({"prompt": "text"})", "no tokenizer");
  std::string long_prompt = R"({"prompt": [1)";
  for (int i = 0; i < 70; ++i)
    long_prompt += ", 2";
  check_400(long_prompt + "]}", "the prompt is 71 tokens long");
}

TEST_CASE("chat: messages, logprobs and errors", "[server]") {
  // No tokenizer here, so every well-formed chat request ends in the no-chat error.
  CHECK_THAT(chat_error(R"({"messages": [{"role": "user", "content": "hi"}]})").message,
             Catch::Contains("no chat template"));
  CHECK_THAT(chat_error(R"({"messages": []})").message, Catch::Contains("must not be empty"));
  CHECK_THAT(chat_error(R"({"messages": "hi"})").message, Catch::Contains("must be an array"));
  CHECK_THAT(chat_error(R"({"messages": [{"content": "hi"}]})").message,
             Catch::Contains("messages[0].role is required"));
  CHECK_THAT(chat_error(R"({"messages": [{"role": "user", "content": 3}]})").message,
             Catch::Contains("messages[0].content must be a string"));
  CHECK_THAT(chat_error(R"({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]})")
                 .message,
             Catch::Contains("in messages[0]: tool_call_id"));
  CHECK_THAT(
      chat_error(R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})").message,
      Catch::Contains("requires 'logprobs'"));
  CHECK_THAT(
      chat_error(R"({"messages": [{"role": "user", "content": "x"}], "tools": [{}]})").message,
      Catch::Contains("'tools' is not supported"));
  CHECK_THAT(
      chat_error(R"({"messages": [{"role": "user", "content": "x"}], "prompt": "x"})").message,
      Catch::Contains("Unrecognized request argument(s) supplied: prompt"));
}

TEST_CASE("json field helpers", "[server]") {
  CHECK(valid_utf8("h\xC3\xA9llo"));
  size_t bad = 0;
  CHECK_FALSE(valid_utf8("ab\xFF", &bad));
  CHECK(bad == 2);
  CHECK_FALSE(valid_utf8("\xC0\x80"));              // overlong
  CHECK(dump(Json("\xFF")) == "\"\xEF\xBF\xBD\"");  // replaced, never throws
  CHECK(error_body(ApiError{.status = 400, .message = "m", .param = "p"}) ==
        R"({"error":{"code":null,"message":"m","param":"p","type":"invalid_request_error"}})");
}
