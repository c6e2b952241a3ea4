// The safetensors parser and mmapped file (engine/model/safetensors.h).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/model/safetensors.h"

using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

const std::string kFile = "/models/m/model-00001-of-00002.safetensors";

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i)
    s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file image: header length, header text, data buffer.
std::string image(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

pmkv::SafetensorsHeader parse(const std::string& file) {
  return pmkv::parse_safetensors(as_bytes(file), kFile);
}

// The LoadError message for `file`, or "" when it parses.
std::string error_of(const std::string& file) {
  try {
    parse(file);
  } catch (const pmkv::LoadError& e) {
    return e.what();
  }
  return "";
}

// One entry of a header written by json (so names and numbers are well-formed).
json entry(const std::string& dtype, json shape, uint64_t begin, uint64_t end) {
  return {{"dtype", dtype}, {"shape", std::move(shape)}, {"data_offsets", {begin, end}}};
}

// An image with a single tensor "w.weight" whose entry is `e` and `data_bytes` of data.
std::string one(const json& e, size_t data_bytes = 8) {
  return image(json{{"w.weight", e}}.dump(), std::string(data_bytes, '\x01'));
}

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ =
        std::filesystem::temp_directory_path() /
        ("pmkv_test_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path write(const std::string& name, const std::string& bytes) const {
    auto p = path_ / name;
    std::ofstream(p, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace

TEST_CASE("safetensors: parses a valid header", "[model][safetensors]") {
  json h;
  h["b.f32"] = entry("F32", {2, 3}, 0, 24);
  h["a.bf16"] = entry("BF16", {4}, 24, 32);
  h["c.f16"] = entry("F16", json::array({1, 1}), 32, 34);
  h["__metadata__"] = {{"format", "pt"}, {"model.embed_tokens.weight", "lm_head.weight"}};
  const std::string header = h.dump();
  auto r = parse(image(header, std::string(34, '\0')));
  CHECK(r.data_start == 8 + header.size());
  REQUIRE(r.tensors.size() == 3);
  // sorted by name
  CHECK(r.tensors[0].name == "a.bf16");
  CHECK(r.tensors[1].name == "b.f32");
  CHECK(r.tensors[2].name == "c.f16");
  CHECK(r.tensors[0].dtype == pmkv::DType::kBF16);
  CHECK(r.tensors[1].dtype == pmkv::DType::kF32);
  CHECK(r.tensors[2].dtype == pmkv::DType::kF16);
  CHECK(r.tensors[1].shape == std::vector<int64_t>{2, 3});
  CHECK(r.tensors[0].shape == std::vector<int64_t>{4});
  CHECK(r.tensors[2].shape == std::vector<int64_t>{1, 1});
  CHECK(r.tensors[1].begin == 0);
  CHECK(r.tensors[1].end == 24);
  CHECK(r.tensors[0].num_bytes() == 8);
  CHECK(r.metadata.size() == 2);
  CHECK(r.metadata.at("format") == "pt");
  CHECK(r.metadata.at("model.embed_tokens.weight") == "lm_head.weight");
  CHECK(std::string(pmkv::dtype_name(pmkv::DType::kBF16)) == "BF16");
  CHECK(pmkv::dtype_size(pmkv::DType::kF32) == 4);
  CHECK(pmkv::dtype_size(pmkv::DType::kF16) == 2);
}

TEST_CASE("safetensors: edge cases that are valid", "[model][safetensors]") {
  // empty header object, no tensors
  CHECK(parse(image("{}")).tensors.empty());
  // trailing space padding of the header (writers pad to 8 bytes) and trailing data bytes
  auto r = parse(image(json{{"w", entry("F32", {1}, 0, 4)}}.dump() + "     ", "abcdEXTRA"));
  REQUIRE(r.tensors.size() == 1);
  CHECK(r.tensors[0].end == 4);
  // scalar (rank 0) tensor
  r = parse(image(json{{"s", entry("F32", json::array(), 0, 4)}}.dump(), "abcd"));
  CHECK(r.tensors[0].shape.empty());
  // empty tensors may share an offset with each other and with a non-empty one; a zero dim
  // makes the tensor empty even when the other dims' product would overflow
  json h;
  h["e1"] = entry("F32", {0, 5}, 0, 0);
  h["e2"] = entry("BF16", {0}, 0, 0);
  h["e3"] = entry("F16", {1ULL << 40, 1ULL << 40, 0}, 2, 2);
  h["x"] = entry("F16", {2}, 0, 4);
  r = parse(image(h.dump(), "abcd"));
  CHECK(r.tensors.size() == 4);
  // unicode tensor names are fine
  r = parse(image(json{{"w\xc3\xa9\xe2\x82\xac", entry("F32", {1}, 0, 4)}}.dump(), "abcd"));
  CHECK(r.tensors[0].name == "w\xc3\xa9\xe2\x82\xac");
}

TEST_CASE("safetensors: rejects malformed files, naming file and tensor", "[model][safetensors]") {
  struct Case {
    const char* what;
    std::string file;
    std::vector<std::string> needles;  // besides the file name
  };
  const json f32_2 = entry("F32", {2}, 0, 8);
  std::vector<Case> cases = {
      {"empty file", "", {"shorter than"}},
      {"7 bytes", std::string(7, '\0'), {"shorter than"}},
      {"header past end", le64(100) + "{}", {"past the end"}},
      {"header 1 byte past end", le64(3) + "{}", {"past the end"}},
      {"absurd header length", le64(200'000'000) + "{}", {"exceeds"}},
      {"max u64 header length", le64(~0ULL) + "{}", {"exceeds"}},
      {"empty header", image(""), {"not valid JSON"}},
      {"truncated JSON", image("{\"a\": "), {"not valid JSON"}},
      {"trailing garbage", image("{} x"), {"not valid JSON"}},
      {"NUL in header", image(std::string("{}\0", 3)), {"not valid JSON"}},
      {"array header", image("[]"), {"not a JSON object"}},
      {"string header", image("\"x\""), {"not a JSON object"}},
      {"invalid UTF-8 byte", image("{\"w\xff\": 1}"), {"UTF-8"}},
      {"overlong UTF-8", image("{\"w\xc0\x80\": 1}"), {"UTF-8"}},
      {"UTF-8 surrogate", image("{\"w\xed\xa0\x80\": 1}"), {"UTF-8"}},
      {"truncated UTF-8", image("{\"w\xe2\x82"), {"UTF-8"}},
      {"escaped lone surrogate", image("{\"w\\ud800\": 1}"), {"not valid JSON"}},
      {"entry not object", image("{\"w.weight\": 5}"), {"w.weight", "not a JSON object"}},
      {"entry is array", image("{\"w.weight\": [1]}"), {"w.weight", "not a JSON object"}},
      {"missing dtype",
       image(R"({"w.weight": {"shape": [2], "data_offsets": [0, 8]}})", "01234567"),
       {"w.weight", "dtype"}},
      {"missing shape",
       image(R"({"w.weight": {"dtype": "F32", "data_offsets": [0, 8]}})", "01234567"),
       {"w.weight", "shape"}},
      {"missing data_offsets",
       image(R"({"w.weight": {"dtype": "F32", "shape": [2]}})", "01234567"),
       {"w.weight", "data_offsets"}},
      {"dtype not string",
       one({{"dtype", 5}, {"shape", {2}}, {"data_offsets", {0, 8}}}),
       {"w.weight", "dtype"}},
      {"dtype I64",
       one(entry("I64", {1}, 0, 8)),
       {"unsupported dtype 'I64' for tensor 'w.weight' in " + kFile}},
      {"dtype F64", one(entry("F64", {1}, 0, 8)), {"unsupported dtype 'F64'", "w.weight"}},
      {"dtype lower case", one(entry("bf16", {4}, 0, 8)), {"unsupported dtype 'bf16'", "w.weight"}},
      {"shape not array",
       one({{"dtype", "F32"}, {"shape", "2"}, {"data_offsets", {0, 8}}}),
       {"w.weight", "shape"}},
      {"shape float", one(entry("F32", {2.5}, 0, 8)), {"w.weight", "shape"}},
      {"shape integral float", one(entry("F32", {2.0}, 0, 8)), {"w.weight", "shape"}},
      {"shape negative", one(entry("F32", {-2}, 0, 8)), {"w.weight", "shape"}},
      {"shape nested", one(entry("F32", {{2}}, 0, 8)), {"w.weight", "shape"}},
      {"shape null dim", one(entry("F32", {nullptr}, 0, 8)), {"w.weight", "shape"}},
      {"shape dim > int64", one(entry("F32", {1ULL << 63}, 0, 8)), {"w.weight", "shape"}},
      {"shape numel overflow",
       one(entry("F32", {1ULL << 32, 1ULL << 32}, 0, 8)),
       {"w.weight", "overflows"}},
      {"shape bytes overflow", one(entry("F32", {1ULL << 62}, 0, 8)), {"w.weight", "overflows"}},
      {"shape 3-way overflow",
       one(entry("BF16", {1ULL << 21, 1ULL << 21, 1ULL << 21}, 0, 8)),
       {"w.weight", "overflows"}},
      {"offsets not array",
       one({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", "0:8"}}),
       {"w.weight", "data_offsets"}},
      {"offsets one element",
       one({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0}}}),
       {"w.weight", "data_offsets"}},
      {"offsets three elements",
       one({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8, 8}}}),
       {"w.weight", "data_offsets"}},
      {"offsets string element",
       one({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, "8"}}}),
       {"w.weight", "data_offsets"}},
      {"offsets negative",
       one({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {-8, 0}}}),
       {"w.weight", "data_offsets"}},
      {"offsets float",
       one({{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8.0}}}),
       {"w.weight", "data_offsets"}},
      {"begin > end", one(entry("F32", {0}, 8, 4)), {"w.weight", "begin 8 > end 4"}},
      {"end past buffer", one(entry("F32", {4}, 0, 16), 8), {"w.weight", "past the end"}},
      {"end past buffer by one", one(entry("F32", {2}, 1, 9), 8), {"w.weight", "past the end"}},
      {"size mismatch short", one(entry("F32", {2}, 0, 4)), {"w.weight", "needs 8"}},
      {"size mismatch long", one(entry("BF16", {2}, 0, 8)), {"w.weight", "needs 4"}},
      {"overlap",
       image(json{{"a.weight", entry("F32", {2}, 0, 8)}, {"b.weight", entry("F32", {2}, 4, 12)}}
                 .dump(),
             std::string(16, '\0')),
       {"a.weight", "b.weight", "overlap"}},
      {"same range twice",
       image(json{{"a.weight", entry("F32", {2}, 0, 8)}, {"b.weight", entry("F16", {4}, 0, 8)}}
                 .dump(),
             std::string(8, '\0')),
       {"a.weight", "b.weight", "overlap"}},
      {"contained range",
       image(json{{"a.weight", entry("F32", {4}, 0, 16)}, {"b.weight", entry("F16", {2}, 4, 8)}}
                 .dump(),
             std::string(16, '\0')),
       {"a.weight", "b.weight", "overlap"}},
      {"duplicate tensor name",
       image("{\"w.weight\": " + f32_2.dump() + ", \"w.weight\": " + f32_2.dump() + "}",
             std::string(8, '\0')),
       {"w.weight", "duplicate"}},
      {"duplicate key in entry",
       image(R"({"w.weight": {"dtype": "F32", "dtype": "F16", )"
             R"("shape": [2], "data_offsets": [0, 8]}})",
             std::string(8, '\0')),
       {"dtype", "duplicate"}},
      {"duplicate metadata",
       image(R"({"__metadata__": {"a": "1"}, "__metadata__": {}})"),
       {"__metadata__", "duplicate"}},
      {"metadata not object", image(R"({"__metadata__": 5})"), {"__metadata__"}},
      {"metadata array", image(R"({"__metadata__": ["a"]})"), {"__metadata__"}},
      {"metadata value not string",
       image(R"({"__metadata__": {"format": 1}})"),
       {"__metadata__", "format"}},
      {"metadata value object",
       image(R"({"__metadata__": {"format": {}}})"),
       {"__metadata__", "format"}},
      {"too deep", image(R"({"w.weight": {"shape": [[[1]]]}})"), {"nested deeper"}},
      {"very deep",
       image("{\"a\":" + std::string(10000, '[') + std::string(10000, ']') + "}"),
       {"nested deeper"}},
      {"array too long",
       one(entry("F32", json(std::vector<int>(65, 1)), 0, 4), 4),
       {"longer than"}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    std::string msg = error_of(c.file);
    CHECK_THAT(msg, Contains(kFile));
    for (const auto& n : c.needles)
      CHECK_THAT(msg, Contains(n));
  }
}

TEST_CASE("safetensors: long tensor names are shortened in messages", "[model][safetensors]") {
  std::string name(5000, 'n');
  std::string msg = error_of(image(json{{name, 5}}.dump()));
  CHECK_THAT(msg, Contains(kFile) && Contains(std::string(200, 'n') + "..."));
  CHECK(msg.size() < 1000);
}

TEST_CASE("safetensors: SafetensorsFile maps a file", "[model][safetensors]") {
  TempDir dir;
  // header of odd length so the data buffer starts unaligned
  std::string header =
      json{{"x", entry("F32", {2}, 0, 8)}, {"y", entry("BF16", {1}, 8, 10)}}.dump();
  if ((8 + header.size()) % 2 == 0) header += " ";
  const std::string data = std::string("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8) + "\x80\x3f";
  auto path = dir.write("model.safetensors", image(header, data));

  auto f = pmkv::SafetensorsFile::open(path);
  CHECK(f.path() == path);
  CHECK(f.header().data_start % 2 == 1);
  REQUIRE(f.tensors().size() == 2);
  const auto* x = f.find("x");
  REQUIRE(x != nullptr);
  CHECK(f.find("z") == nullptr);
  CHECK(f.find("") == nullptr);
  auto bytes = f.data(*x);
  REQUIRE(bytes.size() == 8);
  float v[2];
  std::memcpy(v, bytes.data(), 8);
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.0f);
  const auto* y = f.find("y");
  REQUIRE(y != nullptr);
  CHECK(f.data(*y).size() == 2);
  CHECK(std::to_integer<int>(f.data(*y)[1]) == 0x3f);

  // moves keep the mapping valid
  pmkv::SafetensorsFile g = std::move(f);
  CHECK(std::memcmp(g.data(*g.find("x")).data(), data.data(), 8) == 0);
  auto path2 = dir.write("other.safetensors", image("{}"));
  g = pmkv::SafetensorsFile::open(path2);
  CHECK(g.tensors().empty());
}

TEST_CASE("safetensors: SafetensorsFile errors name the path", "[model][safetensors]") {
  TempDir dir;
  auto missing = dir.path() / "nope.safetensors";
  CHECK_THROWS_WITH(pmkv::SafetensorsFile::open(missing), Contains(missing.string()));
  CHECK_THROWS_WITH(pmkv::SafetensorsFile::open(dir.path()),
                    Contains(dir.path().string()) && Contains("not a regular file"));
  auto empty = dir.write("empty.safetensors", "");
  CHECK_THROWS_WITH(pmkv::SafetensorsFile::open(empty),
                    Contains(empty.string()) && Contains("shorter"));
  auto bad = dir.write("bad.safetensors", one(entry("F32", {4}, 0, 16), 8));
  CHECK_THROWS_WITH(pmkv::SafetensorsFile::open(bad),
                    Contains(bad.string()) && Contains("w.weight") && Contains("past the end"));
}
