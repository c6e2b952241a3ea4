// WeightStore (engine/model/weight_store.h): single-file and sharded model directories.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/common/error.h"
#include "engine/model/weight_store.h"

using Catch::Matchers::Contains;
using Catch::Matchers::Equals;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// ---- a tiny safetensors writer -----------------------------------------------------------------

struct T {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string data;  // raw little-endian bytes
};

std::string u16s(std::initializer_list<uint16_t> v) {
  std::string s;
  for (uint16_t x : v) {
    s += static_cast<char>(x & 0xff);
    s += static_cast<char>(x >> 8);
  }
  return s;
}

std::string f32s(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

std::string f32s(const std::vector<float>& v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

// Tensors laid out back to back in the given order; the header is padded with spaces to a
// multiple of 8 unless `pad` is false.
std::string safetensors(const std::vector<T>& ts, const json& metadata = nullptr, bool pad = true) {
  json h = json::object();
  std::string data;
  for (const auto& t : ts) {
    h[t.name] = {{"dtype", t.dtype},
                 {"shape", t.shape},
                 {"data_offsets", {data.size(), data.size() + t.data.size()}}};
    data += t.data;
  }
  if (!metadata.is_null()) h["__metadata__"] = metadata;
  std::string header = h.dump();
  while (pad && header.size() % 8 != 0)
    header += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("pmkv_test_weights_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  fs::path write(const std::string& name, const std::string& bytes) const {
    auto p = path_ / name;
    std::ofstream(p, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  }

 private:
  fs::path path_;
};

std::string error_of(const fs::path& dir) {
  try {
    pmkv::WeightStore::open(dir);
  } catch (const pmkv::LoadError& e) {
    return e.what();
  }
  return "";
}

uint32_t bits(float f) {
  return std::bit_cast<uint32_t>(f);
}

}  // namespace

TEST_CASE("weights: F32, BF16 and F16 load exactly", "[model][weights]") {
  TempDir dir;
  const std::vector<T> ts = {
      {"f32", "F32", {2, 3}, f32s({1.0f, -2.5f, 3.25f, 1e-40f, -0.0f, 65504.0f})},
      {"bf16", "BF16", {8}, u16s({0x3F80, 0xC040, 0x0001, 0x3EAB, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0})},
      {"f16",
       "F16",
       {2, 6},
       u16s({0x3C00, 0xC000, 0x7BFF, 0x0001, 0x03FF, 0x0400, 0x8000, 0x3555, 0x8001, 0x7C00, 0xFC00,
             0x7E00})},
      {"empty", "F32", {0, 4}, ""},
  };
  // no padding: the data buffer starts at an odd offset half the time, so F32 reads unaligned
  dir.write("model.safetensors", safetensors(ts, nullptr, /*pad=*/false));
  auto ws = pmkv::WeightStore::open(dir.path());

  auto f = ws.load_f32("f32", std::vector<int64_t>{2, 3});
  REQUIRE(f.size() == 6);
  CHECK(f[0] == 1.0f);
  CHECK(f[1] == -2.5f);
  CHECK(f[2] == 3.25f);
  CHECK(bits(f[3]) == bits(1e-40f));
  CHECK(bits(f[4]) == 0x80000000u);
  CHECK(f[5] == 65504.0f);

  auto b = ws.load_f32("bf16", std::vector<int64_t>{8});
  REQUIRE(b.size() == 8);
  CHECK(b[0] == 1.0f);
  CHECK(b[1] == -3.0f);
  CHECK(b[2] == 9.183549615799121e-41f);  // bf16 subnormal 0x0001
  CHECK(bits(b[2]) == 0x00010000u);
  CHECK(b[3] == 0.333984375f);
  CHECK(b[4] == 3.3895313892515355e+38f);
  CHECK(std::isinf(b[5]));
  CHECK(b[5] > 0);
  CHECK(std::isinf(b[6]));
  CHECK(b[6] < 0);
  CHECK(std::isnan(b[7]));

  auto h = ws.load_f32("f16", std::vector<int64_t>{2, 6});
  REQUIRE(h.size() == 12);
  CHECK(h[0] == 1.0f);
  CHECK(h[1] == -2.0f);
  CHECK(h[2] == 65504.0f);
  CHECK(h[3] == 5.960464477539063e-08f);  // smallest subnormal, 2^-24
  CHECK(h[3] == std::ldexp(1.0f, -24));
  CHECK(h[4] == 6.097555160522461e-05f);  // largest subnormal
  CHECK(h[5] == 6.103515625e-05f);        // smallest normal, 2^-14
  CHECK(bits(h[6]) == 0x80000000u);       // -0
  CHECK(h[7] == 0.333251953125f);
  CHECK(h[8] == -5.960464477539063e-08f);
  CHECK(h[9] == std::numeric_limits<float>::infinity());
  CHECK(h[10] == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(h[11]));

  CHECK(ws.load_f32("empty", std::vector<int64_t>{0, 4}).empty());
  CHECK(ws.raw("bf16").size() == 16);
  CHECK(std::to_integer<int>(ws.raw("bf16")[1]) == 0x3F);
  CHECK(ws.raw("empty").empty());
}

TEST_CASE("weights: f16_to_f32 matches IEEE binary16 for all 65536 patterns", "[model][weights]") {
  for (uint32_t x = 0; x < 65536; ++x) {
    const auto hbits = static_cast<uint16_t>(x);
    const float got = pmkv::f16_to_f32(hbits);
    const int sign = (x >> 15) ? -1 : 1;
    const int e = (x >> 10) & 31;
    const int m = x & 1023;
    if (e == 31) {
      if (m == 0) {
        CHECK(got == sign * std::numeric_limits<float>::infinity());
      } else {
        CHECK(std::isnan(got));
        CHECK((bits(got) >> 31) == (x >> 15));
        CHECK(((bits(got) >> 13) & 1023) == static_cast<uint32_t>(m));  // payload kept
      }
      continue;
    }
    // value = (-1)^s * (e ? (1024 + m) * 2^(e-25) : m * 2^-24), in double
    const double v = sign * (e ? std::ldexp(1024.0 + m, e - 25) : std::ldexp(double(m), -24));
    if (got != static_cast<float>(v) || std::signbit(got) != (sign < 0)) {
      FAIL("f16 0x" << std::hex << x << " gave " << got << " expected " << v);
    }
  }
  CHECK(bits(pmkv::bf16_to_f32(0x3F80)) == 0x3F800000u);
  CHECK(bits(pmkv::bf16_to_f32(0x8001)) == 0x80010000u);
}

TEST_CASE("weights: names, info, contains, missing tensors", "[model][weights]") {
  TempDir dir;
  dir.write("model.safetensors",
            safetensors({{"model.norm.weight", "F32", {4}, f32s({1, 2, 3, 4})},
                         {"lm_head.weight", "BF16", {2, 2}, u16s({1, 2, 3, 4})}}));
  auto ws = pmkv::WeightStore::open(dir.path());
  CHECK(ws.names() == std::vector<std::string>{"lm_head.weight", "model.norm.weight"});
  CHECK(ws.contains("lm_head.weight"));
  CHECK_FALSE(ws.contains("model.embed_tokens.weight"));
  const auto& i = ws.info("lm_head.weight");
  CHECK(i.name == "lm_head.weight");
  CHECK(i.dtype == pmkv::DType::kBF16);
  CHECK(i.shape == std::vector<int64_t>{2, 2});
  CHECK(i.file == dir.path() / "model.safetensors");
  CHECK_THROWS_WITH(ws.info("model.embed_tokens.weight"),
                    "missing tensor model.embed_tokens.weight in " + dir.path().string());
  CHECK_THROWS_AS(ws.load_f32("nope", std::vector<int64_t>{1}), pmkv::LoadError);
  CHECK_THROWS_WITH(ws.raw("nope"), Contains("nope") && Contains(dir.path().string()));

  // moved-to store keeps working (the mapping moves with it)
  pmkv::WeightStore moved = std::move(ws);
  CHECK(moved.load_f32("model.norm.weight", std::vector<int64_t>{4}) ==
        std::vector<float>{1, 2, 3, 4});
}

TEST_CASE("weights: shape mismatch message", "[model][weights]") {
  TempDir dir;
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  dir.write("model.safetensors",
            safetensors({{name, "F32", {64, 32}, f32s(std::vector<float>(64 * 32, 0.5f))}}));
  auto ws = pmkv::WeightStore::open(dir.path());
  const std::string file = (dir.path() / "model.safetensors").string();
  CHECK_THROWS_WITH(ws.load_f32(name, std::vector<int64_t>{64, 64}),
                    "tensor " + name + " in " + file + " has shape [64, 32], expected [64, 64]");
  CHECK_THROWS_WITH(ws.load_f32(name, std::vector<int64_t>{2048}),
                    Contains("has shape [64, 32], expected [2048]"));
  CHECK_THROWS_WITH(ws.load_f32(name, std::vector<int64_t>{64, 32, 1}),
                    Contains("expected [64, 32, 1]"));
  auto v = ws.load_f32(name, std::vector<int64_t>{64, 32});
  CHECK(v.size() == 64 * 32);
  CHECK(v[2047] == 0.5f);
}

TEST_CASE("weights: sharded directory with an index", "[model][weights]") {
  TempDir dir;
  const std::string s1 = "model-00001-of-00002.safetensors";
  const std::string s2 = "model-00002-of-00002.safetensors";
  dir.write(s1, safetensors({{"model.embed_tokens.weight",
                              "BF16",
                              {3, 2},
                              u16s({0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0})},
                             {"model.layers.0.input_layernorm.weight", "F32", {2}, f32s({7, 8})}}));
  dir.write(s2, safetensors({{"model.norm.weight", "F16", {2}, u16s({0x3C00, 0xBC00})},
                             {"lm_head.weight", "F32", {3, 2}, f32s({1, 2, 3, 4, 5, 6})}}));
  json index = {{"metadata", {{"total_size", 64}}},
                {"weight_map",
                 {{"model.embed_tokens.weight", s1},
                  {"model.layers.0.input_layernorm.weight", s1},
                  {"model.norm.weight", s2},
                  {"lm_head.weight", s2}}}};
  dir.write("model.safetensors.index.json", index.dump(2));
  // a stray single file is ignored when the index exists
  dir.write("model.safetensors", "garbage");

  auto ws = pmkv::WeightStore::open(dir.path());
  CHECK(ws.names().size() == 4);
  CHECK(ws.info("model.embed_tokens.weight").file == dir.path() / s1);
  CHECK(ws.info("lm_head.weight").file == dir.path() / s2);
  CHECK(ws.load_f32("model.embed_tokens.weight", std::vector<int64_t>{3, 2}) ==
        std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(ws.load_f32("model.norm.weight", std::vector<int64_t>{2}) == std::vector<float>{1, -1});
  CHECK(ws.load_f32("lm_head.weight", std::vector<int64_t>{3, 2}) ==
        std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(ws.load_f32("model.layers.0.input_layernorm.weight", std::vector<int64_t>{2}) ==
        std::vector<float>{7, 8});
}

TEST_CASE("weights: index problems name the index, shard and tensor", "[model][weights]") {
  TempDir dir;
  const std::string s1 = "a.safetensors";
  const std::string s2 = "b.safetensors";
  dir.write(s1, safetensors({{"x.weight", "F32", {1}, f32s({1})}}));
  dir.write(s2, safetensors({{"y.weight", "F32", {1}, f32s({2})}}));
  const std::string index_file = (dir.path() / "model.safetensors.index.json").string();
  auto with_map = [&](const json& weight_map) {
    dir.write("model.safetensors.index.json", json{{"weight_map", weight_map}}.dump());
    return error_of(dir.path());
  };

  CHECK(with_map({{"x.weight", s1}, {"y.weight", s2}}).empty());
  // extra tensors in a shard that the map does not list are still available
  CHECK(with_map({{"x.weight", s1}}).empty());

  for (const std::string bad : {"../a.safetensors", "sub/a.safetensors", "/etc/passwd", "..", ".",
                                "", "a..safetensors", "sub\\a.safetensors"}) {
    INFO(bad);
    CHECK_THAT(with_map({{"x.weight", bad}}),
               Contains(index_file) && Contains("x.weight") && Contains("plain file name"));
  }
  CHECK_THAT(with_map({{"y.weight", s1}}),
             Contains(index_file) && Contains("y.weight") && Contains(s1) && Contains("not in"));
  CHECK_THAT(with_map({{"x.weight", "missing.safetensors"}}),
             Contains((dir.path() / "missing.safetensors").string()));
  CHECK_THAT(with_map({{"x.weight", 3}}), Contains(index_file) && Contains("x.weight"));
  CHECK_THAT(with_map(json::array({s1})), Contains(index_file) && Contains("weight_map"));
  CHECK_THAT(with_map(json::object()), Contains(index_file) && Contains("weight_map"));

  dir.write("model.safetensors.index.json", "{\"weight_map\": {");
  CHECK_THAT(error_of(dir.path()), Contains(index_file) && Contains("JSON"));
  dir.write("model.safetensors.index.json", "{\"metadata\": {}}");
  CHECK_THAT(error_of(dir.path()), Contains(index_file) && Contains("weight_map"));

  // the same tensor in two shards
  dir.write(
      s2, safetensors({{"x.weight", "F32", {1}, f32s({3})}, {"z.weight", "F32", {1}, f32s({4})}}));
  CHECK_THAT(with_map({{"x.weight", s1}, {"z.weight", s2}}),
             Contains("x.weight") && Contains(s1) && Contains(s2) && Contains("two shards"));

  // a broken shard: the message names the shard file and the tensor
  dir.write(s2, std::string("\x10\0\0\0\0\0\0\0", 8) + "{\"q.weight\": 1} ");
  CHECK_THAT(with_map({{"x.weight", s1}, {"q.weight", s2}}),
             Contains((dir.path() / s2).string()) && Contains("q.weight"));
}

TEST_CASE("weights: directories without weights", "[model][weights]") {
  TempDir dir;
  CHECK_THAT(
      error_of(dir.path()),
      Equals("no model.safetensors or model.safetensors.index.json in " + dir.path().string()));
  CHECK_THAT(error_of(dir.path() / "absent"), Contains((dir.path() / "absent").string()));
  dir.write("model.safetensors", "short");
  CHECK_THAT(error_of(dir.path()),
             Contains((dir.path() / "model.safetensors").string()) && Contains("shorter"));
}

TEST_CASE("weights: tinystories-656K from the shared models", "[model][weights]") {
  const fs::path dir = fs::path(PMKV_SHARED_DIR) / "models/tinystories-656K";
  if (!fs::exists(dir / "model.safetensors")) {
    WARN("skipped: " << dir << " is absent");
    return;
  }
  auto ws = pmkv::WeightStore::open(dir);
  // tied embeddings are stored only as lm_head.weight
  CHECK(ws.contains("lm_head.weight"));
  CHECK_FALSE(ws.contains("model.embed_tokens.weight"));
  CHECK(ws.names().size() == 20);
  CHECK(ws.info("lm_head.weight").shape == std::vector<int64_t>{2048, 128});
  CHECK(ws.info("model.norm.weight").shape == std::vector<int64_t>{128});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    INFO(p);
    CHECK(ws.info(p + "self_attn.q_proj.weight").shape == std::vector<int64_t>{128, 128});
    CHECK(ws.info(p + "self_attn.k_proj.weight").shape == std::vector<int64_t>{64, 128});
    CHECK(ws.info(p + "self_attn.v_proj.weight").shape == std::vector<int64_t>{64, 128});
    CHECK(ws.info(p + "self_attn.o_proj.weight").shape == std::vector<int64_t>{128, 128});
    CHECK(ws.info(p + "mlp.gate_proj.weight").shape == std::vector<int64_t>{384, 128});
    CHECK(ws.info(p + "mlp.up_proj.weight").shape == std::vector<int64_t>{384, 128});
    CHECK(ws.info(p + "mlp.down_proj.weight").shape == std::vector<int64_t>{128, 384});
    CHECK(ws.info(p + "input_layernorm.weight").shape == std::vector<int64_t>{128});
    CHECK(ws.info(p + "post_attention_layernorm.weight").shape == std::vector<int64_t>{128});
  }
  for (const auto& n : ws.names())
    CHECK(ws.info(n).dtype == pmkv::DType::kF32);
  auto emb = ws.load_f32("lm_head.weight", std::vector<int64_t>{2048, 128});
  REQUIRE(emb.size() == 2048 * 128);
  bool all_finite = true, any_nonzero = false;
  for (float x : emb) {
    all_finite = all_finite && std::isfinite(x);
    any_nonzero = any_nonzero || x != 0.0f;
  }
  CHECK(all_finite);
  CHECK(any_nonzero);
}
