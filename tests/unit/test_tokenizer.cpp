// Tokenizer: sentencepiece encode/decode against reference ids from the PyPI sentencepiece
// (0.2.0, /work/main/.venv), and BOS/EOS/config resolution from temporary model directories.
#include <catch2/catch.hpp>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/unit/tokenizer_test_util.h"

namespace fs = std::filesystem;
using pmkv::InvalidArgument;
using pmkv::LoadError;
using pmkv::Tokenizer;
using Ids = std::vector<int32_t>;

namespace {

using pmkv::testing::kLlama2Model;
using pmkv::testing::kTok512Model;
using pmkv::testing::TempModelDir;

std::string load_error_message(const fs::path& dir) {
  try {
    (void)Tokenizer::load(dir);
  } catch (const LoadError& e) {
    return e.what();
  }
  FAIL("Tokenizer::load(" << dir << ") did not throw LoadError");
  return {};
}

}  // namespace

TEST_CASE("llama2 tokenizer: vocabulary and special ids", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  TempModelDir dir;
  const Tokenizer tok = Tokenizer::load(dir.path());
  CHECK(tok.vocab_size() == 32000);
  REQUIRE(tok.bos_id().has_value());
  CHECK(*tok.bos_id() == 1);
  CHECK(tok.eos_ids() == Ids{2});
  CHECK(tok.default_eos_id() == 2);
  CHECK(tok.add_bos_token());
  CHECK_FALSE(tok.add_eos_token());
  CHECK_FALSE(tok.chat_template().has_value());

  CHECK(tok.piece(15043) == "▁Hello");
  CHECK(tok.piece(0) == "<unk>");
  CHECK(tok.piece(1) == "<s>");
  CHECK(tok.piece(2) == "</s>");
  CHECK(tok.piece_to_id("▁Hello") == 15043);
  CHECK(tok.piece_to_id("</s>") == 2);
  CHECK_FALSE(tok.piece_to_id("▁definitely-not-a-piece").has_value());

  // Byte-fallback pieces are ids 3..258 (<0x00>..<0xFF>).
  CHECK(tok.is_byte_piece(3));
  CHECK(tok.byte_value(3) == uint8_t{0x00});
  CHECK(tok.is_byte_piece(243));
  CHECK(tok.byte_value(243) == uint8_t{0xF0});
  CHECK(tok.byte_value(258) == uint8_t{0xFF});
  CHECK_FALSE(tok.is_byte_piece(259));
  CHECK_FALSE(tok.byte_value(15043).has_value());
  CHECK_FALSE(tok.is_byte_piece(1));
  CHECK(tok.is_control(1));
  CHECK(tok.is_control(2));
  CHECK_FALSE(tok.is_control(15043));
}

TEST_CASE("llama2 tokenizer: encode matches the PyPI sentencepiece", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  TempModelDir dir;
  const Tokenizer tok = Tokenizer::load(dir.path());
  struct Case {
    std::string text;
    Ids ids;
  };
  const std::vector<Case> cases = {
      {"Hello world", {15043, 3186}},
      {"Once upon a time", {9038, 2501, 263, 931}},
      {"I love 🦙 and 🚀!",
       {306, 5360, 29871, 243, 162, 169, 156, 322, 29871, 243, 162, 157, 131, 29991}},
      {"你好，世界", {29871, 30919, 31076, 30214, 30793, 30967}},
      {"Café déjà vu, naïve façade",
       {315, 28059, 20737, 18679, 29892, 1055, 30085, 345, 2258, 30019, 1943}},
      {"日本語のテキスト", {29871, 30325, 30346, 30968, 30199, 30572, 30454, 30255, 30279}},
      {"ß∂ƒ©˙∆˚¬…æ",
       {29871, 30034, 30934, 30703, 30211, 206, 156, 31576, 31878, 30320, 30098, 30078}},
      {"😀 Zürich → 東京 ✈️",
       {29871, 243, 162, 155, 131, 24931, 10309, 29871, 30591, 30675, 29871, 229, 159, 139, 30598}},
      {" leading space", {29871, 8236, 2913}},
      {"two  spaces\nnewline", {1023, 29871, 8162, 13, 1482, 1220}},
      {"\t tab", {29871, 12, 4434}},
      {"<s>[INST] hi [/INST]", {529, 29879, 24566, 25580, 29962, 7251, 518, 29914, 25580, 29962}},
      {"", {}},
  };
  for (const auto& c : cases) {
    INFO("text: " << c.text);
    CHECK(tok.encode(c.text, false) == c.ids);
    Ids with_bos = {1};
    with_bos.insert(with_bos.end(), c.ids.begin(), c.ids.end());
    CHECK(tok.encode(c.text, true) == with_bos);
    // Llama 2's normalizer keeps whitespace, so decode(encode(x)) == x.
    CHECK(tok.decode(c.ids) == c.text);
  }
}

TEST_CASE("llama2 tokenizer: decode rules", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  TempModelDir dir;
  const Tokenizer tok = Tokenizer::load(dir.path());
  // Control pieces are invisible; the dummy-prefix space of the first word is dropped.
  CHECK(tok.decode(Ids{1, 15043, 3186, 2}) == "Hello world");
  CHECK(tok.decode(Ids{3186}) == "world");
  CHECK(tok.decode(Ids{15043, 2, 3186}) == "Hello world");
  // Byte pieces: E2 82 AC is the euro sign; an incomplete sequence gives one U+FFFD per byte.
  CHECK(tok.decode(Ids{229, 133, 175}) == "€");
  CHECK(tok.decode(Ids{229, 133}) == "\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(tok.decode(Ids{229, 15043}) == "\xEF\xBF\xBD Hello");
  // <unk> decodes to " ⁇ ".
  CHECK(tok.decode(Ids{0}) == " \xE2\x81\x87 ");
  CHECK(tok.decode(Ids{}) == "");

  CHECK_THROWS_AS(tok.decode(Ids{15043, 32000}), InvalidArgument);
  CHECK_THROWS_AS(tok.decode(Ids{-1}), InvalidArgument);
  CHECK_THROWS_WITH(tok.decode(Ids{40000}), Catch::Contains("40000"));
  CHECK_THROWS_AS(tok.piece(32000), InvalidArgument);
  CHECK_THROWS_AS(tok.is_byte_piece(-5), InvalidArgument);
  CHECK_THROWS_AS(tok.byte_value(32000), InvalidArgument);
}

TEST_CASE("llama2 tokenizer: round trip of random text", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  TempModelDir dir;
  const Tokenizer tok = Tokenizer::load(dir.path());
  const std::vector<std::string> alphabet = {"a",    "b", "z", "Q", " ",  "  ", "\n",
                                             ".",    ",", "é", "ü", "中", "文", "→",
                                             "🦙", "😀", "€", "ß", "7",  "'"};
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int len = static_cast<int>(rng() % 40);
    for (int i = 0; i < len; ++i) {
      text += alphabet[rng() % alphabet.size()];
    }
    INFO("text: " << text);
    CHECK(tok.decode(tok.encode(text, true)) == text);
  }
}

TEST_CASE("encode_prompt: config flags and special tokens in text", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  SECTION("defaults: BOS, no EOS, <s> and </s> in text become control ids") {
    TempModelDir dir;
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.encode_prompt("Hello world") == Ids{1, 15043, 3186});
    // Legacy LlamaTokenizer: the text after a special token gets its own dummy prefix ("▁[").
    CHECK(tok.encode_prompt("<s>[INST] hi [/INST]", true) ==
          Ids{1, 1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962});
    CHECK(tok.encode_segments("<s>[INST] hi [/INST]", true) ==
          Ids{1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962});
    CHECK(tok.encode_segments("Hello</s><unk>", true) == Ids{15043, 2, 0});
    CHECK(tok.encode_segments("Hello</s> world", true) == Ids{15043, 2, 29871, 3186});
    // Without parsing, the text is plain characters.
    CHECK(tok.encode_prompt("<s>[INST] hi [/INST]", false) ==
          Ids{1, 529, 29879, 24566, 25580, 29962, 7251, 518, 29914, 25580, 29962});
    CHECK(tok.encode_prompt("") == Ids{1});
  }
  SECTION("add_bos_token false, add_eos_token true") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"add_bos_token": false, "add_eos_token": true})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK_FALSE(tok.add_bos_token());
    CHECK(tok.add_eos_token());
    CHECK(tok.encode_prompt("Hello world") == Ids{15043, 3186, 2});
    // encode() follows its argument, not the config.
    CHECK(tok.encode("Hello world", true) == Ids{1, 15043, 3186});
  }
}

TEST_CASE("BOS/EOS resolution across the config files", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  SECTION("tokenizer_config.json tokens, as strings or AddedToken objects") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({
      "bos_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": false},
      "eos_token": "<s>", "pad_token": null, "unk_token": "<unk>"})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.bos_id() == 0);
    CHECK(tok.eos_ids() == Ids{1});
    CHECK(tok.default_eos_id() == 1);
  }
  SECTION("config.json beats tokenizer_config.json for BOS; EOS is the union") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"bos_token": "<unk>", "eos_token": "</s>"})");
    dir.write("config.json",
              R"({"model_type": "llama", "bos_token_id": 5, "eos_token_id": [7, 2]})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.bos_id() == 5);
    CHECK(tok.eos_ids() == Ids{7, 2});
    CHECK(tok.default_eos_id() == 2);
  }
  SECTION("generation_config.json beats config.json for BOS; EOS is the union in order") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"eos_token": "<unk>"})");
    dir.write("config.json", R"({"bos_token_id": 5, "eos_token_id": [7, 8]})");
    dir.write("generation_config.json", R"({"bos_token_id": 9, "eos_token_id": 10})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.bos_id() == 9);
    CHECK(tok.eos_ids() == Ids{10, 7, 8, 0});
    CHECK(tok.default_eos_id() == 0);
  }
  SECTION("generation_config.json alone, eos as a list with a duplicate") {
    TempModelDir dir;
    dir.write("generation_config.json", R"({"bos_token_id": 4, "eos_token_id": [12, 11, 12]})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.bos_id() == 4);
    CHECK(tok.eos_ids() == Ids{12, 11});
    // add_eos_token appends the model's </s> when tokenizer_config.json names no eos_token.
    CHECK(tok.default_eos_id() == 2);
  }
  SECTION("null values fall through to the next source") {
    TempModelDir dir;
    dir.write("generation_config.json", R"({"bos_token_id": null, "eos_token_id": null})");
    dir.write("config.json", R"({"bos_token_id": 6, "eos_token_id": null})");
    dir.write("tokenizer_config.json", R"({"bos_token": null, "eos_token": null})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.bos_id() == 6);
    CHECK(tok.eos_ids() == Ids{2});
  }
  SECTION("the BOS id feeds encode") {
    TempModelDir dir;
    dir.write("generation_config.json", R"({"bos_token_id": 9})");
    const Tokenizer tok = Tokenizer::load(dir.path());
    CHECK(tok.encode("Hello", true) == Ids{9, 15043});
    CHECK(tok.encode_prompt("Hello") == Ids{9, 15043});
  }
}

TEST_CASE("chat_template sources", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  SECTION("a string") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"chat_template": "{{ bos_token }}{{ messages }}"})");
    CHECK(Tokenizer::load(dir.path()).chat_template() == "{{ bos_token }}{{ messages }}");
  }
  SECTION("a list of named templates") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"chat_template": [
      {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
    CHECK(Tokenizer::load(dir.path()).chat_template() == "D");
  }
  SECTION("chat_template.jinja when tokenizer_config.json has none") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"add_bos_token": true})");
    dir.write("chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}");
    CHECK(Tokenizer::load(dir.path()).chat_template() ==
          "{% for m in messages %}{{ m.content }}{% endfor %}");
  }
}

TEST_CASE("load errors name the file and key", "[tokenizer]") {
  REQUIRE_MODEL(kLlama2Model);
  SECTION("no tokenizer.model") {
    TempModelDir dir(fs::path{});
    CHECK_FALSE(Tokenizer::available(dir.path()));
    const std::string msg = load_error_message(dir.path());
    CHECK_THAT(msg, Catch::Contains("tokenizer.model"));
    CHECK_THAT(msg, Catch::Contains(dir.path().string()));
  }
  SECTION("a malformed tokenizer.model") {
    TempModelDir dir(fs::path{});
    std::mt19937 rng(7);
    std::string junk;
    for (int i = 0; i < 4096; ++i) {
      junk.push_back(static_cast<char>(rng()));
    }
    dir.write("tokenizer.model", junk);
    CHECK(Tokenizer::available(dir.path()));
    CHECK_THAT(load_error_message(dir.path()),
               Catch::Contains((dir.path() / "tokenizer.model").string()));
  }
  SECTION("an empty tokenizer.model") {
    TempModelDir dir(fs::path{});
    dir.write("tokenizer.model", "");
    CHECK_THAT(load_error_message(dir.path()), Catch::Contains("tokenizer.model"));
  }
  SECTION("JSON that does not parse") {
    TempModelDir dir;
    dir.write("generation_config.json", R"({"eos_token_id": [2, )");
    CHECK_THAT(load_error_message(dir.path()), Catch::Contains("generation_config.json"));
  }
  SECTION("a top level that is not an object") {
    TempModelDir dir;
    dir.write("config.json", "[1, 2]");
    CHECK_THAT(load_error_message(dir.path()), Catch::Contains("config.json"));
  }
  SECTION("eos_token_id of the wrong type") {
    TempModelDir dir;
    dir.write("config.json", R"({"eos_token_id": "2"})");
    const std::string msg = load_error_message(dir.path());
    CHECK_THAT(msg, Catch::Contains("config.json"));
    CHECK_THAT(msg, Catch::Contains("eos_token_id"));
  }
  SECTION("an id outside the vocabulary") {
    TempModelDir dir;
    dir.write("generation_config.json", R"({"eos_token_id": [2, 128009]})");
    const std::string msg = load_error_message(dir.path());
    CHECK_THAT(msg, Catch::Contains("generation_config.json"));
    CHECK_THAT(msg, Catch::Contains("eos_token_id"));
    CHECK_THAT(msg, Catch::Contains("128009"));
  }
  SECTION("a special token that is not a piece") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"eos_token": {"content": "<|im_end|>"}})");
    const std::string msg = load_error_message(dir.path());
    CHECK_THAT(msg, Catch::Contains("tokenizer_config.json"));
    CHECK_THAT(msg, Catch::Contains("eos_token"));
    CHECK_THAT(msg, Catch::Contains("<|im_end|>"));
  }
  SECTION("add_bos_token of the wrong type") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"add_bos_token": "yes"})");
    CHECK_THAT(load_error_message(dir.path()), Catch::Contains("add_bos_token"));
  }
  SECTION("bos_token of the wrong type") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"bos_token": 1})");
    CHECK_THAT(load_error_message(dir.path()), Catch::Contains("bos_token"));
  }
  SECTION("chat_template of the wrong type") {
    TempModelDir dir;
    dir.write("tokenizer_config.json", R"({"chat_template": 3})");
    CHECK_THAT(load_error_message(dir.path()), Catch::Contains("chat_template"));
  }
}

TEST_CASE("tok512 (stories260K) tokenizer", "[tokenizer]") {
  REQUIRE_MODEL(kTok512Model);
  TempModelDir dir(kTok512Model);
  const Tokenizer tok = Tokenizer::load(dir.path());
  CHECK(tok.vocab_size() == 512);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_ids() == Ids{2});
  CHECK(tok.encode("Once upon a time", false) == Ids{403, 407, 261, 378});
  CHECK(tok.encode("Lily saw a big dog.", true) == Ids{1, 317, 394, 261, 370, 400, 428, 426});
  CHECK(tok.encode("héllo 🦙", false) == Ids{270, 485, 306, 414, 410, 243, 162, 169, 156});
  CHECK(tok.decode(Ids{270, 485, 306, 414, 410, 243, 162, 169, 156}) == "héllo 🦙");
  CHECK(tok.is_byte_piece(243));
  CHECK(tok.byte_value(243) == uint8_t{0xF0});
}
