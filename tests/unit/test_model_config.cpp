// config.json parsing (engine/model/model_config.h) and RoPE inverse frequencies.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include "engine/common/error.h"
#include "engine/model/model_config.h"

using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

const std::string kSrc = "/models/x/config.json";

// A small Llama config in the shape transformers 4.4x writes.
json llama_base() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": null,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16"
  })");
}

pmkv::ModelConfig parse(const json& j) {
  return pmkv::parse_model_config_text(j.dump(), kSrc);
}

// The error message of parsing `j`, or "" when it parses.
std::string error_of(const json& j) {
  try {
    parse(j);
  } catch (const pmkv::LoadError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("config: llama basics and defaults", "[model][config]") {
  auto c = parse(llama_base());
  CHECK(c.model_type == "llama");
  CHECK(c.vocab_size == 2048);
  CHECK(c.hidden_size == 128);
  CHECK(c.intermediate_size == 384);
  CHECK(c.num_layers == 2);
  CHECK(c.num_heads == 8);
  CHECK(c.num_kv_heads == 4);
  CHECK(c.head_dim == 16);  // derived
  CHECK(c.q_width() == 128);
  CHECK(c.kv_width() == 64);
  CHECK(c.group_size() == 2);
  CHECK(c.max_position_embeddings == 512);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.rope.type == pmkv::RopeType::kDefault);
  CHECK(c.rope.theta == 10000.0);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK_FALSE(c.qkv_bias);
  CHECK_FALSE(c.o_bias);
  CHECK_FALSE(c.mlp_bias);
  CHECK_FALSE(c.sliding_window.has_value());
  CHECK(c.torch_dtype == "bfloat16");
  REQUIRE(c.bos_token_id.has_value());
  CHECK(*c.bos_token_id == 1);
  CHECK(c.eos_token_ids == std::vector<int32_t>{2});
}

TEST_CASE("config: defaults for absent optional keys", "[model][config]") {
  json j = llama_base();
  for (const char* k : {"num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling",
                        "bos_token_id", "eos_token_id", "torch_dtype", "hidden_act"}) {
    j.erase(k);
  }
  j["dtype"] = "float16";  // the transformers 5 spelling of torch_dtype
  auto c = parse(j);
  CHECK(c.num_kv_heads == 8);
  CHECK(c.group_size() == 1);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope.theta == 10000.0);
  CHECK_FALSE(c.bos_token_id.has_value());
  CHECK(c.eos_token_ids.empty());
  CHECK(c.torch_dtype == "float16");
}

TEST_CASE("config: head_dim explicit, null, derived", "[model][config]") {
  json j = llama_base();
  j["head_dim"] = 32;  // explicit, different from hidden/heads (Mistral-Nemo style)
  auto c = parse(j);
  CHECK(c.head_dim == 32);
  CHECK(c.q_width() == 256);
  CHECK(c.kv_width() == 128);
  j["head_dim"] = nullptr;
  CHECK(parse(j).head_dim == 16);
  j.erase("head_dim");
  CHECK(parse(j).head_dim == 16);
  j["hidden_size"] = 130;  // not divisible by 8 heads and no head_dim
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("hidden_size") && Contains("head_dim"));
  j["head_dim"] = 16;  // explicit head_dim makes it fine
  CHECK(parse(j).head_dim == 16);
}

TEST_CASE("config: llama 3.1 with llama3 rope_scaling and eos list", "[model][config]") {
  json j = llama_base();
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192},
                       {"rope_type", "llama3"}};
  j["eos_token_id"] = {128001, 128008, 128009};
  j["bos_token_id"] = 128000;
  auto c = parse(j);
  CHECK(c.rope.type == pmkv::RopeType::kLlama3);
  CHECK(c.rope.theta == 500000.0);
  CHECK(c.rope.factor == 8.0);
  CHECK(c.rope.low_freq_factor == 1.0);
  CHECK(c.rope.high_freq_factor == 4.0);
  CHECK(c.rope.original_max_position_embeddings == 8192);
  CHECK(c.eos_token_ids == std::vector<int32_t>{128001, 128008, 128009});
  CHECK(*c.bos_token_id == 128000);
}

TEST_CASE("config: llama attention_bias and mlp_bias", "[model][config]") {
  json j = llama_base();
  j["attention_bias"] = true;
  auto c = parse(j);
  CHECK(c.qkv_bias);
  CHECK(c.o_bias);
  CHECK_FALSE(c.mlp_bias);
  j["attention_bias"] = false;
  j["mlp_bias"] = true;
  c = parse(j);
  CHECK_FALSE(c.qkv_bias);
  CHECK_FALSE(c.o_bias);
  CHECK(c.mlp_bias);
  j["mlp_bias"] = "yes";
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("mlp_bias"));
}

TEST_CASE("config: llama ignores sliding_window", "[model][config]") {
  json j = llama_base();
  j["sliding_window"] = 64;
  CHECK_FALSE(parse(j).sliding_window.has_value());
}

TEST_CASE("config: mistral sliding window", "[model][config]") {
  json j = llama_base();
  j["model_type"] = "mistral";
  j["sliding_window"] = 4096;
  j["attention_bias"] = true;  // not a Mistral key: no bias anyway
  auto c = parse(j);
  CHECK(c.model_type == "mistral");
  REQUIRE(c.sliding_window.has_value());
  CHECK(*c.sliding_window == 4096);
  CHECK_FALSE(c.qkv_bias);
  CHECK_FALSE(c.o_bias);
  j["sliding_window"] = nullptr;
  CHECK_FALSE(parse(j).sliding_window.has_value());
  j.erase("sliding_window");
  CHECK_FALSE(parse(j).sliding_window.has_value());
  j["sliding_window"] = 0;
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("sliding_window"));
  j["sliding_window"] = 16;
  j["layer_types"] = {"sliding_attention", "full_attention"};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("sliding"));
  j["layer_types"] = {"full_attention", "full_attention"};
  CHECK_FALSE(parse(j).sliding_window.has_value());
}

TEST_CASE("config: qwen2 biases, tie and sliding window", "[model][config]") {
  json j = llama_base();
  j["model_type"] = "qwen2";
  j["attention_bias"] = false;  // not a Qwen2 key: q/k/v always have a bias
  j["tie_word_embeddings"] = true;
  j["sliding_window"] = 4096;
  j["use_sliding_window"] = false;
  j["max_window_layers"] = 2;
  auto c = parse(j);
  CHECK(c.qkv_bias);
  CHECK_FALSE(c.o_bias);
  CHECK_FALSE(c.mlp_bias);
  CHECK(c.tie_word_embeddings);
  CHECK_FALSE(c.sliding_window.has_value());  // use_sliding_window false

  j["use_sliding_window"] = true;  // but max_window_layers (2) covers both layers: none slide
  CHECK_FALSE(parse(j).sliding_window.has_value());
  j["max_window_layers"] = 0;  // every layer slides
  c = parse(j);
  REQUIRE(c.sliding_window.has_value());
  CHECK(*c.sliding_window == 4096);
  j["max_window_layers"] = 1;  // layer 0 full, layer 1 sliding: not representable
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("max_window_layers"));
  j.erase("tie_word_embeddings");
  j["max_window_layers"] = 0;
  CHECK_FALSE(parse(j).tie_word_embeddings);
}

TEST_CASE("config: rope_parameters (transformers 5) form", "[model][config]") {
  json j = llama_base();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "llama3"},   {"rope_theta", 500000.0},
                          {"factor", 32.0},          {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  auto c = parse(j);
  CHECK(c.rope.type == pmkv::RopeType::kLlama3);
  CHECK(c.rope.theta == 500000.0);
  CHECK(c.rope.factor == 32.0);
  CHECK(c.rope.original_max_position_embeddings == 8192);

  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  c = parse(j);
  CHECK(c.rope.type == pmkv::RopeType::kDefault);
  CHECK(c.rope.theta == 1000000.0);

  j["rope_parameters"] = {{"rope_type", "linear"}, {"rope_theta", 10000.0}, {"factor", 2.0}};
  c = parse(j);
  CHECK(c.rope.type == pmkv::RopeType::kLinear);
  CHECK(c.rope.factor == 2.0);

  // rope_parameters wins over a stale rope_scaling
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  CHECK(parse(j).rope.type == pmkv::RopeType::kLinear);

  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 10000.0}, {"factor", 4.0}};
  CHECK_THAT(error_of(j),
             Contains(kSrc) && Contains("rope_parameters.rope_type") && Contains("yarn"));
  j["rope_parameters"] = {{"rope_type", "default"}, {"partial_rotary_factor", 0.5}};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("partial_rotary_factor"));
  j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 10000.0}, {"factor", 8.0}};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_parameters.low_freq_factor"));
  j["rope_parameters"] = "default";
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_parameters"));
}

TEST_CASE("config: classic rope_scaling forms", "[model][config]") {
  json j = llama_base();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};  // older "type" spelling
  auto c = parse(j);
  CHECK(c.rope.type == pmkv::RopeType::kLinear);
  CHECK(c.rope.factor == 4.0);
  j["rope_scaling"] = {{"rope_type", "default"}};
  CHECK(parse(j).rope.type == pmkv::RopeType::kDefault);

  for (const char* t : {"yarn", "dynamic", "longrope", "ntk"}) {
    j["rope_scaling"] = {{"rope_type", t}, {"factor", 4.0}};
    CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_scaling.rope_type") && Contains(t));
  }
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 4.0}};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_scaling.type") && Contains("dynamic"));
  j["rope_scaling"] = {{"factor", 4.0}};  // no type at all
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_scaling.rope_type"));
  j["rope_scaling"] = {{"rope_type", "linear"}};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_scaling.factor"));
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", -1.0}};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_scaling.factor"));
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 4.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("high_freq_factor"));
  j["rope_scaling"] = nullptr;
  j["partial_rotary_factor"] = 0.5;
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("partial_rotary_factor"));
  j["partial_rotary_factor"] = 1.0;
  CHECK(parse(j).rope.type == pmkv::RopeType::kDefault);
  j["rope_theta"] = "big";
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("rope_theta"));
}

TEST_CASE("config: validation names file and key", "[model][config]") {
  struct Case {
    const char* key;
    json value;  // null: erase the key
  };
  const Case cases[] = {
      {"vocab_size", nullptr},
      {"vocab_size", 0},
      {"hidden_size", "128"},
      {"hidden_size", 128.5},
      {"intermediate_size", -4},
      {"num_hidden_layers", true},
      {"num_attention_heads", nullptr},
      {"num_key_value_heads", 3},  // 8 % 3 != 0
      {"max_position_embeddings", nullptr},
      {"rms_norm_eps", 0.0},
      {"rms_norm_eps", "1e-5"},
      {"tie_word_embeddings", 1},
      {"head_dim", 15},  // odd
      {"head_dim", 0},
      {"bos_token_id", -1},
      {"eos_token_id", json::array({2, "x"})},
      {"eos_token_id", 4294967296LL},
      {"torch_dtype", 16},
      {"hidden_act", "gelu"},
      {"model_type", 7},
      {"model_type", nullptr},
      {"vocab_size", 1LL << 40},
  };
  for (const auto& tc : cases) {
    json j = llama_base();
    if (tc.value.is_null()) {
      j.erase(tc.key);
    } else {
      j[tc.key] = tc.value;
    }
    INFO(tc.key << " = " << tc.value.dump());
    CHECK_THAT(error_of(j), Contains(kSrc) && Contains(tc.key));
  }
}

TEST_CASE("config: unsupported model_type and malformed JSON", "[model][config]") {
  json j = llama_base();
  j["model_type"] = "gpt2";
  CHECK_THAT(error_of(j), Contains(kSrc) && Contains("model_type") && Contains("gpt2"));
  CHECK_THROWS_WITH(pmkv::parse_model_config_text("{\"model_type\": \"llama\",", kSrc),
                    Contains(kSrc) && Contains("JSON"));
  CHECK_THROWS_WITH(pmkv::parse_model_config_text("[1, 2]", kSrc), Contains(kSrc));
  CHECK_THROWS_AS(pmkv::parse_model_config_text("", kSrc), pmkv::LoadError);
}

TEST_CASE("config: parse_model_config reads a file", "[model][config]") {
  auto dir =
      std::filesystem::temp_directory_path() / ("pmkv_test_config_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto path = dir / "config.json";
  { std::ofstream(path) << llama_base().dump(2); }
  auto c = pmkv::parse_model_config(path);
  CHECK(c.hidden_size == 128);
  { std::ofstream(path) << "{ not json"; }
  CHECK_THROWS_WITH(pmkv::parse_model_config(path), Contains(path.string()));
  std::filesystem::remove_all(dir);
  CHECK_THROWS_WITH(pmkv::parse_model_config(path), Contains(path.string()));
}

TEST_CASE("config: tinystories-656K from the shared models", "[model][config]") {
  auto path = std::filesystem::path(PMKV_SHARED_DIR) / "models/tinystories-656K/config.json";
  if (!std::filesystem::exists(path)) {
    WARN("skipped: " << path << " is absent");
    return;
  }
  auto c = pmkv::parse_model_config(path);
  CHECK(c.model_type == "llama");
  CHECK(c.vocab_size == 2048);
  CHECK(c.hidden_size == 128);
  CHECK(c.num_layers == 2);
  CHECK(c.num_heads == 8);
  CHECK(c.num_kv_heads == 4);
  CHECK(c.head_dim == 16);
  CHECK(c.tie_word_embeddings);
  CHECK(c.rms_norm_eps == 1e-6);
}

// ---- rope_inv_freq ----------------------------------------------------------------------------

TEST_CASE("rope_inv_freq: default and linear against the formula", "[model][rope]") {
  json j = llama_base();  // head_dim 16, theta 10000
  auto c = parse(j);
  auto f = pmkv::rope_inv_freq(c);
  REQUIRE(f.size() == 8);
  for (int k = 0; k < 8; ++k) {
    // 1 / 10000^(2k/16), written out as a product so it is computed differently
    double expected = 1.0;
    for (int s = 0; s < 2 * k; ++s)
      expected /= std::exp(std::log(10000.0) / 16.0);
    CHECK(f[k] == Approx(expected).epsilon(1e-6));
  }
  CHECK(f[0] == 1.0f);
  CHECK(f[4] == Approx(0.01).epsilon(1e-6));  // 10000^(-8/16)

  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto g = pmkv::rope_inv_freq(parse(j));
  REQUIRE(g.size() == 8);
  for (int k = 0; k < 8; ++k)
    CHECK(g[k] == Approx(f[k] / 4.0).epsilon(1e-6));
}

TEST_CASE("rope_inv_freq: llama3 (Llama 3.1 8B parameters)", "[model][rope]") {
  json j = llama_base();
  j["hidden_size"] = 4096;
  j["num_attention_heads"] = 32;
  j["num_key_value_heads"] = 8;
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192},
                       {"rope_type", "llama3"}};
  auto c = parse(j);
  REQUIRE(c.head_dim == 128);
  auto f = pmkv::rope_inv_freq(c);
  REQUIRE(f.size() == 64);

  // Hard-coded from python3's math module running transformers' _compute_llama3_parameters
  // formula in double:
  //   inv = 1/(500000**(2k/128)); wavelen = 2*pi/inv; high band (wavelen < 2048) unchanged,
  //   low band (wavelen > 8192) inv/8, else smooth = (8192/wavelen - 1)/3,
  //   (1-smooth)*inv/8 + smooth*inv.
  const std::pair<int, double> expected[] = {
      {0, 1.0},                      // high frequency band: unchanged
      {4, 0.44036660267178046},      //
      {20, 0.016560440080994446},    //
      {28, 0.0032114459947525913},   // last of the high band
      {29, 0.002166570763503359},    // medium band (smoothed)
      {30, 0.0013718935677611381},   //
      {32, 0.0005248461609929547},   //
      {34, 0.00017850781276799638},  // last of the medium band
      {36, 7.78465527393245e-05},    // low band: divided by 8
      {48, 6.647869871181236e-06},   //
      {60, 5.677088100759837e-07},   //
  };
  for (const auto& [k, v] : expected) {
    INFO("k = " << k);
    CHECK(f[k] == Approx(v).epsilon(1e-6));
  }

  // And every entry against the long-form formula.
  const double pi = std::acos(-1.0);
  for (int k = 0; k < 64; ++k) {
    double inv = std::pow(500000.0, -(2.0 * k) / 128.0);
    double wavelen = 2 * pi / inv;
    double e;
    if (wavelen < 8192.0 / 4.0) {
      e = inv;
    } else if (wavelen > 8192.0 / 1.0) {
      e = inv / 8.0;
    } else {
      double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      e = (1 - smooth) * inv / 8.0 + smooth * inv;
    }
    INFO("k = " << k);
    CHECK(f[k] == Approx(e).epsilon(1e-6));
  }
}
