// RequestStream: blocking next(), merged poll(), the notifier and cancellation across threads.
#include <catch2/catch.hpp>

#include <atomic>
#include <thread>

#include "engine/serving/request_stream.h"

using namespace pmkv;
using namespace std::chrono_literals;

namespace {

StreamUpdate token(int32_t id, std::string text) {
  StreamUpdate u;
  u.tokens.push_back({id, std::move(text), std::nullopt, {}});
  u.completion_tokens = id;
  return u;
}

}  // namespace

TEST_CASE("request stream: next() blocks, times out, and ends after the last update",
          "[serving][stream]") {
  RequestStream s;
  CHECK_FALSE(s.next(1ms).has_value());
  std::thread producer([&] {
    std::this_thread::sleep_for(5ms);
    s.push(token(1, "a"));
    StreamUpdate last = token(2, "b");
    last.end = StreamEnd::kFinished;
    last.finish_reason = FinishReason::kLength;
    s.push(last);
    s.push(token(3, "ignored after the end"));
  });
  auto u = s.next(2s);
  REQUIRE(u);
  CHECK(u->tokens.at(0).text == "a");
  u = s.next(2s);
  REQUIRE(u);
  CHECK(u->end == StreamEnd::kFinished);
  producer.join();
  CHECK(s.finished());
  CHECK_FALSE(s.next(1s).has_value());  // at once, not after a second
}

TEST_CASE("request stream: poll() merges everything pending", "[serving][stream]") {
  RequestStream s;
  CHECK_FALSE(s.poll().has_value());
  s.push(token(1, "x"));
  s.push(token(2, "y"));
  StreamUpdate end;
  end.end = StreamEnd::kCancelled;
  end.completion_tokens = 2;
  s.push(end);
  const auto u = s.poll();
  REQUIRE(u);
  REQUIRE(u->tokens.size() == 2);
  CHECK(u->tokens[1].text == "y");
  CHECK(u->end == StreamEnd::kCancelled);
  CHECK(u->completion_tokens == 2);
  CHECK_FALSE(s.poll().has_value());
}

TEST_CASE("request stream: the notifier fires per push, and at once for earlier pushes",
          "[serving][stream]") {
  RequestStream s;
  s.push(token(1, "early"));
  std::atomic<int> calls{0};
  s.set_notifier([&] { ++calls; });
  CHECK(calls == 1);
  s.push(token(2, "late"));
  CHECK(calls == 2);
  // The notifier may call back into the stream (no deadlock).
  s.set_notifier([&] {
    s.cancel();
    (void)s.poll();
  });
  s.push(token(3, "z"));
  CHECK(s.cancelled());
}
