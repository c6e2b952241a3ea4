// IncrementalDetokenizer: every chunk is valid UTF-8 and the chunks add up to Tokenizer::decode of
// the whole sequence, for real text and for random id sequences heavy in byte pieces.
#include <catch2/catch.hpp>

#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/tokenizer/detokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/unit/tokenizer_test_util.h"

namespace fs = std::filesystem;
using pmkv::IncrementalDetokenizer;
using pmkv::InvalidArgument;
using pmkv::Tokenizer;
using Ids = std::vector<int32_t>;

namespace {

using pmkv::testing::kLlama2Model;
using pmkv::testing::kTok512Model;

// Loads a tokenizer from a temporary directory holding only a copy of `model`.
Tokenizer load_tokenizer(const fs::path& model) {
  const pmkv::testing::TempModelDir dir(model);
  return Tokenizer::load(dir.path());
}

// Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF, no truncated sequences.
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      len = 1;
      cp = c;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

struct Streamed {
  std::vector<std::string> chunks;  // one per push, then the flush
  std::string text;                 // their concatenation
};

// Streams `ids` through a detokenizer, checking after every push that each chunk is valid UTF-8
// and that the text so far is a prefix of `expected` (text is never retracted).
Streamed stream(const Tokenizer& tok, const Ids& ids, const std::string& expected,
                const Ids& context = {}) {
  IncrementalDetokenizer detok(tok, context);
  Streamed out;
  for (int32_t id : ids) {
    out.chunks.push_back(detok.push(id));
    INFO("after id " << id << " chunk [" << out.chunks.back() << "]");
    CHECK(valid_utf8(out.chunks.back()));
    out.text += out.chunks.back();
    CHECK(expected.starts_with(out.text));
  }
  CHECK(detok.size() == ids.size());
  out.chunks.push_back(detok.flush());
  CHECK(valid_utf8(out.chunks.back()));
  out.text += out.chunks.back();
  CHECK(detok.flush().empty());
  return out;
}

const std::vector<std::string> kTexts = {
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "I love 🦙 and 🚀!",
    "😀😃😄😁 emoji in a row 🧑‍🚀",
    "你好，世界。今天天气很好。",
    "日本語のテキスト",
    "Café déjà vu, naïve façade — Ünïcödé",
    "ß∂ƒ©˙∆˚¬…æ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  two leading spaces\n\nand\ttabs  ",
    "Zürich → 東京 ✈️ €100",
    "a",
    " ",
};

}  // namespace

TEST_CASE("detokenizer: real text streams to decode(ids)", "[detokenizer]") {
  for (const auto& model : {kLlama2Model, kTok512Model}) {
    REQUIRE_MODEL(model);
    const Tokenizer tok = load_tokenizer(model);
    for (const auto& text : kTexts) {
      for (bool bos : {false, true}) {
        const Ids ids = tok.encode(text, bos);
        const std::string expected = tok.decode(ids);
        INFO("model " << model.filename() << ", text [" << text << "], bos " << bos);
        const Streamed s = stream(tok, ids, expected);
        CHECK(s.text == expected);
      }
    }
  }
}

TEST_CASE("detokenizer: llama2 text round trips exactly", "[detokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  const Tokenizer tok = load_tokenizer(kLlama2Model);
  for (const auto& text : kTexts) {
    INFO("text [" << text << "]");
    // Llama 2 keeps whitespace, so the stream reproduces the text itself.
    CHECK(stream(tok, tok.encode(text, true), text).text == text);
  }
}

TEST_CASE("detokenizer: chunk boundaries", "[detokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  const Tokenizer tok = load_tokenizer(kLlama2Model);
  SECTION("the first word loses its dummy-prefix space, later words keep theirs") {
    const Streamed s = stream(tok, Ids{15043, 3186}, "Hello world");
    CHECK(s.chunks == std::vector<std::string>{"Hello", " world", ""});
  }
  SECTION("BOS and EOS produce no text and do not disturb spacing") {
    const Streamed s = stream(tok, Ids{1, 15043, 2, 3186}, "Hello world");
    CHECK(s.chunks == std::vector<std::string>{"", "Hello", "", " world", ""});
  }
  SECTION("byte pieces are held until the character is complete") {
    // E2 82 AC = "€" spelled in byte pieces (ids = 3 + byte).
    const Streamed s = stream(tok, Ids{15043, 3 + 0xE2, 3 + 0x82, 3 + 0xAC, 3186}, "Hello€ world");
    CHECK(s.chunks == std::vector<std::string>{"Hello", "", "", "€", " world", ""});
  }
  SECTION("a 4-byte emoji after a lone \"▁\"") {
    // "▁", F0 9F A6 99 = " 🦙" after earlier text.
    const Ids ids = {306, 29871, 243, 162, 169, 156};
    const Streamed s = stream(tok, ids, "I 🦙");
    CHECK(s.chunks == std::vector<std::string>{"I", " ", "", "", "", "🦙", ""});
  }
  SECTION("a lone \"▁\" first, then a word: both spaces as in decode") {
    const Ids ids = {29871, 29871, 15043};
    CHECK(tok.decode(ids) == "  Hello");
    CHECK(stream(tok, ids, "  Hello").text == "  Hello");
  }
  SECTION("an incomplete character at the end is flushed as U+FFFD per byte") {
    const Streamed s =
        stream(tok, Ids{15043, 3 + 0xE2, 3 + 0x82}, tok.decode(Ids{15043, 229, 133}));
    CHECK(s.chunks == std::vector<std::string>{"Hello", "", "", "\xEF\xBF\xBD\xEF\xBF\xBD"});
  }
  SECTION("an invalid byte is emitted at once as U+FFFD") {
    // 0x80 can never start a character, 0x41 is "A".
    const Streamed s = stream(tok, Ids{15043, 3 + 0x80, 3 + 0x41},
                              "Hello\xEF\xBF\xBD"
                              "A");
    CHECK(s.chunks == std::vector<std::string>{"Hello", "\xEF\xBF\xBD", "A", ""});
  }
  SECTION("a character cut short by a control piece") {
    const Ids ids = {3 + 0xE2, 3 + 0x82, 2, 15043};
    const std::string expected = tok.decode(ids);
    CHECK(expected == "\xEF\xBF\xBD\xEF\xBF\xBD Hello");
    CHECK(stream(tok, ids, expected).text == expected);
  }
}

TEST_CASE("detokenizer: prompt context", "[detokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  const Tokenizer tok = load_tokenizer(kLlama2Model);
  SECTION("the first generated word keeps its space after the prompt") {
    const Ids prompt = tok.encode("Once upon a", true);
    const Ids gen = {931, 29892};  // "▁time", ","
    const Streamed s = stream(tok, gen, " time,", prompt);
    CHECK(s.chunks == std::vector<std::string>{" time", ",", ""});
  }
  SECTION("a prompt of control pieces only behaves like no context") {
    const Streamed s = stream(tok, Ids{931}, "time", Ids{1});
    CHECK(s.text == "time");
  }
  SECTION("a prompt ending inside a character: the completed character is emitted") {
    const Ids prompt = {1, 15043, 3 + 0xE2, 3 + 0x82};
    Ids all = prompt;
    all.push_back(3 + 0xAC);
    CHECK(tok.decode(all) == "Hello€");
    const Streamed s = stream(tok, Ids{3 + 0xAC}, "€", prompt);
    CHECK(s.text == "€");
  }
  SECTION("ids outside the vocabulary in the context are rejected") {
    CHECK_THROWS_AS(IncrementalDetokenizer(tok, Ids{1, 32000}), InvalidArgument);
  }
}

TEST_CASE("detokenizer: bad ids and misuse", "[detokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  const Tokenizer tok = load_tokenizer(kLlama2Model);
  IncrementalDetokenizer detok(tok);
  CHECK(detok.push(15043) == "Hello");
  CHECK_THROWS_AS(detok.push(32000), InvalidArgument);
  CHECK_THROWS_AS(detok.push(-1), InvalidArgument);
  // A rejected id leaves no trace.
  CHECK(detok.size() == 1);
  CHECK(detok.push(3186) == " world");
  CHECK(detok.flush().empty());
  CHECK_THROWS_AS(detok.push(3186), std::logic_error);
}

namespace {

// Random ids biased toward the hard cases: byte pieces (multi-byte characters, truncated and
// invalid sequences), control pieces, <unk> and the lone "▁" piece.
Ids random_ids(const Tokenizer& tok, std::mt19937& rng, size_t n, int32_t lone_space) {
  std::vector<int32_t> bytes;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    if (tok.is_byte_piece(id)) bytes.push_back(id);
  }
  // UTF-8 lead bytes followed by the right number of continuation bytes, to build real characters.
  auto byte_id = [&](int value) { return bytes.at(static_cast<size_t>(value)); };
  Ids ids;
  while (ids.size() < n) {
    const unsigned r = rng() % 100;
    if (r < 30) {
      ids.push_back(bytes[rng() % bytes.size()]);
    } else if (r < 45) {
      // A well-formed 2..4 byte character, sometimes cut short.
      const int len = 2 + static_cast<int>(rng() % 3);
      const int lead = len == 2   ? 0xC2 + static_cast<int>(rng() % 30)
                       : len == 3 ? 0xE1 + static_cast<int>(rng() % 12)
                                  : 0xF0 + static_cast<int>(rng() % 4);
      ids.push_back(byte_id(lead));
      const int cont = (rng() % 5 == 0) ? static_cast<int>(rng() % len) : len - 1;
      for (int k = 0; k < cont; ++k) {
        ids.push_back(byte_id(0x90 + static_cast<int>(rng() % 0x20)));
      }
    } else if (r < 53) {
      ids.push_back(static_cast<int32_t>(rng() % 3));  // <unk>, <s>, </s>
    } else if (r < 60) {
      ids.push_back(lone_space);
    } else {
      ids.push_back(static_cast<int32_t>(rng() % static_cast<unsigned>(tok.vocab_size())));
    }
  }
  ids.resize(n);
  return ids;
}

void check_random_sequences(const Tokenizer& tok, uint32_t seed, int trials) {
  const int32_t lone_space = tok.piece_to_id("▁").value();
  std::mt19937 rng(seed);
  for (int trial = 0; trial < trials; ++trial) {
    const Ids ids = random_ids(tok, rng, 1 + rng() % 40, lone_space);
    const std::string expected = tok.decode(ids);
    INFO("trial " << trial);
    CHECK(stream(tok, ids, expected).text == expected);

    // With a prompt as context (ending in a piece that is not a byte): the stream is the
    // continuation of the prompt's text.
    Ids prompt = random_ids(tok, rng, rng() % 12, lone_space);
    int32_t last = 0;  // a random piece that is neither a byte nor a control piece
    do {
      last = static_cast<int32_t>(rng() % static_cast<unsigned>(tok.vocab_size()));
    } while (tok.is_byte_piece(last) || tok.is_control(last));
    prompt.push_back(last);
    Ids all = prompt;
    all.insert(all.end(), ids.begin(), ids.end());
    const std::string prompt_text = tok.decode(prompt);
    const std::string all_text = tok.decode(all);
    REQUIRE(all_text.starts_with(prompt_text));
    const std::string continuation = all_text.substr(prompt_text.size());
    CHECK(stream(tok, ids, continuation, prompt).text == continuation);
  }
}

}  // namespace

TEST_CASE("detokenizer: random id sequences (llama2)", "[detokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  check_random_sequences(load_tokenizer(kLlama2Model), 20240501, 400);
}

TEST_CASE("detokenizer: random id sequences (tok512)", "[detokenizer]") {
  REQUIRE_MODEL(kTok512Model);
  check_random_sequences(load_tokenizer(kTok512Model), 42, 400);
}

TEST_CASE("detokenizer: the decode window stays short on long repetitive output", "[detokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  const Tokenizer tok = load_tokenizer(kLlama2Model);
  // Words, runs of lone "▁" pieces, runs of EOS (ignore_eos) and byte-spelled characters.
  Ids pattern = {15043};
  pattern.insert(pattern.end(), 50, 29871);
  pattern.insert(pattern.end(), 50, 2);
  for (int32_t id : {3186, 1, 29871, 3 + 0xE2, 3 + 0x82, 3 + 0xAC}) {
    pattern.push_back(id);
  }
  IncrementalDetokenizer detok(tok);
  Ids ids;
  std::string text;
  size_t max_window = 0;
  for (int rep = 0; rep < 60; ++rep) {
    for (int32_t id : pattern) {
      ids.push_back(id);
      text += detok.push(id);
      max_window = std::max(max_window, detok.window_size());
    }
  }
  text += detok.flush();
  CHECK(text == tok.decode(ids));
  // The ids of the last emitted chunk and those held since: here at most the 3 bytes of "€" and
  // the id before them.
  CHECK(max_window <= 4);
}

TEST_CASE("detokenizer: random id sequences (pmkv-ref, the default model)", "[detokenizer]") {
  // Its own 12K sentencepiece model (byte fallback, trained on Debian text): the server's default.
  const Tokenizer tok = Tokenizer::load(fs::path(PMKV_SOURCE_DIR) / "models" / "pmkv-ref");
  check_random_sequences(tok, 7, 400);
}
