// StopChecker: stop strings across chunk boundaries with hold-back, earliest stop wins whatever the
// chunking, include_stop_str_in_output, EOS / stop tokens / ignore_eos, max_tokens, UTF-8.
#include <catch2/catch.hpp>

#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/sampling/sampling_params.h"
#include "engine/sampling/stop_checker.h"

using pmkv::FinishReason;
using pmkv::SamplingParams;
using pmkv::StopChecker;
using pmkv::StopUpdate;
using Ids = std::vector<int32_t>;

namespace {

constexpr int32_t kText = 100;  // a token id that is neither EOS nor a stop token
const Ids kEos = {2};

SamplingParams with_stops(std::vector<std::string> stop, bool include = false,
                          int32_t max_tokens = 1000) {
  SamplingParams p;
  p.stop = std::move(stop);
  p.include_stop_str_in_output = include;
  p.max_tokens = max_tokens;
  return p;
}

struct Run {
  std::vector<std::string> chunks;  // what each append() released
  std::string text;                 // everything released
  StopUpdate last;
};

Run feed(StopChecker& checker, const std::vector<std::string>& chunks) {
  Run run;
  for (const auto& c : chunks) {
    REQUIRE_FALSE(checker.finished());
    run.last = checker.append(kText, c);
    run.chunks.push_back(run.last.text);
    run.text += run.last.text;
    if (run.last.finished()) break;
  }
  return run;
}

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

}  // namespace

TEST_CASE("finish reasons print as OpenAI's", "[stop]") {
  CHECK(pmkv::to_string(FinishReason::kStop) == "stop");
  CHECK(pmkv::to_string(FinishReason::kLength) == "length");
}

TEST_CASE("no stop strings: text passes through, max_tokens ends with length", "[stop]") {
  StopChecker checker(with_stops({}, false, 3), kEos);
  CHECK(checker.tokens_remaining() == 3);
  StopUpdate u = checker.append(kText, "Hello");
  CHECK(u.text == "Hello");
  CHECK_FALSE(u.finished());
  u = checker.append(kText, " wor");
  CHECK(u.text == " wor");
  CHECK(checker.tokens_remaining() == 1);
  u = checker.append(kText, "ld");
  CHECK(u.text == "ld");
  REQUIRE(u.finished());
  CHECK(*u.finish == FinishReason::kLength);
  CHECK_FALSE(u.stop_string.has_value());
  CHECK(checker.num_tokens() == 3);
  CHECK_THROWS_AS(checker.append(kText, "!"), std::logic_error);
  CHECK_THROWS_AS(checker.finish(FinishReason::kLength), std::logic_error);
}

TEST_CASE("a stop string split over chunks is held back and never shown", "[stop]") {
  SECTION("excluded from the output") {
    StopChecker checker(with_stops({"###"}), kEos);
    const Run run = feed(checker, {"Hello #", "#", "# world"});
    CHECK(run.chunks == std::vector<std::string>{"Hello ", "", ""});
    REQUIRE(run.last.finished());
    CHECK(*run.last.finish == FinishReason::kStop);
    CHECK(run.last.stop_string == "###");
    CHECK(run.text == "Hello ");
  }
  SECTION("included in the output") {
    StopChecker checker(with_stops({"###"}, true), kEos);
    const Run run = feed(checker, {"Hello #", "#", "# world"});
    CHECK(run.chunks == std::vector<std::string>{"Hello ", "", "###"});
    CHECK(run.text == "Hello ###");
  }
  SECTION("a false start is released as soon as it cannot match") {
    StopChecker checker(with_stops({"abc"}), kEos);
    StopUpdate u = checker.append(kText, "xa");
    CHECK(u.text == "x");
    CHECK(checker.held_back() == "a");
    u = checker.append(kText, "b");
    CHECK(u.text == "");
    CHECK(checker.held_back() == "ab");
    u = checker.append(kText, "d");
    CHECK(u.text == "abd");
    CHECK(checker.held_back().empty());
    // Overlapping prefixes: "aab" holds "ab" back, not "aab".
    u = checker.append(kText, "aab");
    CHECK(u.text == "a");
    CHECK(checker.held_back() == "ab");
    u = checker.append(kText, "c!");
    CHECK(u.text == "");
    CHECK(u.stop_string == "abc");
  }
  SECTION("a stop string inside one chunk") {
    StopChecker checker(with_stops({"</answer>"}), kEos);
    const Run run = feed(checker, {"42</answer> trailing"});
    CHECK(run.text == "42");
    CHECK(run.last.stop_string == "</answer>");
  }
}

TEST_CASE("several stop strings: the one that ends first wins", "[stop]") {
  SECTION("earlier occurrence of a later-listed stop") {
    StopChecker checker(with_stops({"world", "lo"}), kEos);
    const Run run = feed(checker, {"Hello world"});
    CHECK(run.text == "Hel");
    CHECK(run.last.stop_string == "lo");
  }
  SECTION("ends first beats starts first, whatever the chunking") {
    for (const auto& chunks : std::vector<std::vector<std::string>>{
             {"xabcd"}, {"xab", "cd"}, {"xabc", "d"}, {"x", "a", "b", "c", "d"}}) {
      StopChecker checker(with_stops({"abcd", "bc"}), kEos);
      const Run run = feed(checker, chunks);
      CHECK(run.text == "xa");
      CHECK(run.last.stop_string == "bc");
    }
  }
  SECTION("same end: the longest") {
    StopChecker checker(with_stops({"cd", "bcd"}), kEos);
    const Run run = feed(checker, {"abcde"});
    CHECK(run.text == "a");
    CHECK(run.last.stop_string == "bcd");
  }
}

TEST_CASE("EOS and stop tokens", "[stop]") {
  SECTION("EOS stops; its text is dropped, held text released") {
    StopChecker checker(with_stops({"###"}), kEos);
    CHECK(checker.append(kText, "done #").text == "done ");
    const StopUpdate u = checker.append(2, "</s>");
    CHECK(u.text == "#");
    REQUIRE(u.finished());
    CHECK(*u.finish == FinishReason::kStop);
    CHECK_FALSE(u.stop_string.has_value());
    CHECK_FALSE(u.stop_token.has_value());
  }
  SECTION("EOS text kept with include_stop_str_in_output") {
    StopChecker checker(with_stops({}, true), kEos);
    checker.append(kText, "a");
    CHECK(checker.append(2, "</s>").text == "</s>");
  }
  SECTION("ignore_eos generates through EOS") {
    SamplingParams p = with_stops({}, false, 2);
    p.ignore_eos = true;
    StopChecker checker(p, kEos);
    StopUpdate u = checker.append(2, "");
    CHECK_FALSE(u.finished());
    u = checker.append(kText, "x");
    CHECK(u.text == "x");
    CHECK(u.finish == FinishReason::kLength);
  }
  SECTION("stop_token_ids stop and are reported, even with ignore_eos") {
    SamplingParams p;
    p.stop_token_ids = {7, 9};
    p.ignore_eos = true;
    StopChecker checker(p, kEos);
    checker.append(kText, "a");
    const StopUpdate u = checker.append(9, "<|end|>");
    CHECK(u.text.empty());
    CHECK(u.finish == FinishReason::kStop);
    CHECK(u.stop_token == 9);
  }
  SECTION("a stop beats max_tokens on the same token") {
    StopChecker checker(with_stops({"!"}, false, 2), kEos);
    checker.append(kText, "a");
    const StopUpdate u = checker.append(kText, "b!");
    CHECK(u.text == "b");
    CHECK(u.finish == FinishReason::kStop);
  }
  SECTION("length releases the held text") {
    StopChecker checker(with_stops({"###"}, false, 2), kEos);
    CHECK(checker.append(kText, "a#").text == "a");
    const StopUpdate u = checker.append(kText, "#");
    CHECK(u.text == "##");
    CHECK(u.finish == FinishReason::kLength);
  }
}

TEST_CASE("finish(): an outside end releases held text, a tail may still stop", "[stop]") {
  SECTION("context full") {
    StopChecker checker(with_stops({"###"}), kEos);
    CHECK(checker.append(kText, "a#").text == "a");
    const StopUpdate u = checker.finish(FinishReason::kLength, "\xEF\xBF\xBD");
    CHECK(u.text == "#\xEF\xBF\xBD");
    CHECK(u.finish == FinishReason::kLength);
  }
  SECTION("the tail completes a stop string") {
    StopChecker checker(with_stops({"##"}), kEos);
    CHECK(checker.append(kText, "a#").text == "a");
    const StopUpdate u = checker.finish(FinishReason::kLength, "#b");
    CHECK(u.text == "");
    CHECK(u.finish == FinishReason::kStop);
    CHECK(u.stop_string == "##");
  }
}

TEST_CASE("UTF-8 stop strings and text", "[stop]") {
  StopChecker checker(with_stops({"。", "→ 東"}), kEos);
  const Run run = feed(checker, {"你好", "世界", "→", " ", "東京", "。"});
  for (const auto& c : run.chunks) {
    CHECK(valid_utf8(c));
  }
  CHECK(run.text == "你好世界");
  CHECK(run.last.stop_string == "→ 東");
}

namespace {

// The reference: the stop occurrence that ends first in the whole text (longest on ties).
struct Expected {
  std::string text;
  std::optional<std::string> stop;
  size_t cut = std::string::npos;  // where a stop string starts
};

Expected reference(const std::string& full, const std::vector<std::string>& stops, bool include) {
  Expected e;
  size_t best_end = std::string::npos, best_start = 0;
  for (const auto& s : stops) {
    const size_t pos = full.find(s);
    if (pos == std::string::npos) continue;
    const size_t end = pos + s.size();
    if (!e.stop || end < best_end || (end == best_end && pos < best_start)) {
      e.stop = s;
      best_end = end;
      best_start = pos;
    }
  }
  if (!e.stop) {
    e.text = full;
    return e;
  }
  e.cut = best_start;
  e.text = full.substr(0, include ? best_end : best_start);
  return e;
}

}  // namespace

TEST_CASE("random texts, stops and chunkings agree with the whole-text reference", "[stop]") {
  const std::vector<std::string> alphabet = {"a", "b", "c", "é", "中", "🙂", " "};
  std::mt19937 rng(31337);
  auto word = [&](size_t len) {
    std::string s;
    for (size_t i = 0; i < len; ++i) {
      s += alphabet[rng() % alphabet.size()];
    }
    return s;
  };
  int stopped = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::string> stops;
    const size_t n_stops = 1 + rng() % 3;
    for (size_t i = 0; i < n_stops; ++i) {
      stops.push_back(word(1 + rng() % 4));
    }
    const bool include = rng() % 2 == 0;
    // Text as characters, chunked at character boundaries (as the detokenizer delivers it).
    std::vector<std::string> chars;
    const size_t len = rng() % 30;
    for (size_t i = 0; i < len; ++i) {
      chars.push_back(alphabet[rng() % alphabet.size()]);
    }
    std::vector<std::string> chunks;
    std::string full;
    for (size_t i = 0; i < chars.size();) {
      const size_t take = std::min(chars.size() - i, static_cast<size_t>(rng() % 4));
      std::string c;
      for (size_t k = 0; k < take; ++k) {
        c += chars[i + k];
      }
      chunks.push_back(c);
      full += c;
      i += take;
    }
    const Expected expected = reference(full, stops, include);
    INFO("trial " << trial << " text [" << full << "]");

    StopChecker checker(with_stops(stops, include), kEos);
    std::string shown;
    StopUpdate last;
    std::string fed;
    for (const auto& c : chunks) {
      last = checker.append(kText, c);
      fed += c;
      CHECK(valid_utf8(last.text));
      shown += last.text;
      if (last.finished()) break;
      // Never a byte of the stop occurrence before the stop, and nothing lost: shown + held is
      // everything fed so far.
      CHECK(shown.size() <= expected.cut);
      CHECK(shown + checker.held_back() == fed);
    }
    if (!last.finished()) {
      last = checker.finish(FinishReason::kLength);
      shown += last.text;
    }
    CHECK(shown == expected.text);
    CHECK(last.stop_string == expected.stop);
    CHECK(last.finish == (expected.stop ? FinishReason::kStop : FinishReason::kLength));
    if (expected.stop) ++stopped;
  }
  // The generator must exercise both outcomes.
  CHECK(stopped > 300);
  CHECK(stopped < 2700);
}
