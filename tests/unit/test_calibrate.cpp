// Calibration: the exact allocator against brute force, the budgets file round trip, folding key
// scales leaves full-precision logits unchanged, and calibration is deterministic for a seed.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include "engine/calibrate/allocate.h"
#include "engine/calibrate/calibration_data.h"
#include "engine/calibrate/key_scales.h"
#include "engine/calibrate/sensitivity.h"
#include "engine/common/error.h"
#include "engine/kv/kv_config.h"
#include "engine/runtime/local_model.h"

namespace fs = std::filesystem;
using namespace pmkv;
using namespace pmkv::calibrate;

namespace {

fs::path golden(const char* model) {
  return fs::path(PMKV_SOURCE_DIR) / "tests/fixtures/golden" / model;
}

std::vector<int32_t> golden_prompt(const char* model) {
  std::ifstream in(golden(model) / "golden.json");
  const auto j = nlohmann::json::parse(in);
  return j["prompts"].back()["prompt_ids"].get<std::vector<int32_t>>();
}

Sensitivity random_sensitivity(std::mt19937& rng, int layers, const std::vector<int>& bits) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  Sensitivity s;
  s.bits = bits;
  for (int b : bits) {
    for (int l = 0; l < layers; ++l) {
      // coarser bits are (usually) more sensitive, with noise
      s.k[b].push_back(u(rng) * 16.0 / b);
      s.v[b].push_back(u(rng) * 16.0 / b);
    }
  }
  return s;
}

fs::path temp_file(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / "pmkv_test_calibrate";
  fs::create_directories(d);
  return d / name;
}

}  // namespace

TEST_CASE("calibrate allocate: exact DP equals brute force on small instances", "[calibrate]") {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 300; ++trial) {
    const int layers = 1 + static_cast<int>(rng() % 7);
    const std::vector<int> bits = (trial % 2) ? std::vector<int>{4, 2} : std::vector<int>{8, 4, 2};
    const Sensitivity s = random_sensitivity(rng, layers, bits);
    AllocationProblem p{bits, 0, 256, 1024, 64};
    const int64_t unit = layer_cost_bytes(p, 1);
    // between all-at-the-cheapest and all-at-the-richest, sometimes off the unit grid
    p.memory_bytes = unit * (2 * layers + static_cast<int64_t>(rng() % (6 * layers + 1))) +
                     static_cast<int64_t>(rng() % unit);
    const Allocation dp = allocate(s, p);
    const Allocation bf = allocate_brute_force(s, p);
    INFO("trial " << trial);
    REQUIRE(dp.total_sensitivity == Approx(bf.total_sensitivity).epsilon(1e-12));
    REQUIRE(dp.total_bytes <= p.memory_bytes);
  }
}

TEST_CASE("calibrate allocate: too little memory is a clear error", "[calibrate]") {
  std::mt19937 rng(1);
  const Sensitivity s = random_sensitivity(rng, 4, {4, 2});
  const AllocationProblem p{{4, 2}, 4 * 2 * 512 * 2 * 1000 / 8 - 1, 512, 1000, 128};
  CHECK_THROWS_WITH(allocate(s, p), Catch::Contains("cannot hold 4 layers even at 2 bits"));
  const AllocationProblem q{{8}, 1 << 30, 512, 1000, 128};
  CHECK_THROWS_WITH(allocate(s, q), Catch::Contains("no values for 8 bits"));
}

TEST_CASE("calibrate allocate: the budgets file is what the KV cache reads", "[calibrate]") {
  std::mt19937 rng(3);
  const Sensitivity s = random_sensitivity(rng, 5, {4, 2});
  const AllocationProblem p{{4, 2}, 3 * 5 * 256 * 2 * 4096 / 8, 256, 4096, 64};  // 3 bits/layer
  const Allocation a = allocate(s, p);
  int fours = 0;
  for (int b : a.bits)
    fours += b == 4;
  CHECK(fours == 2);  // 2 x 4 + 3 x 2 = 14 <= 15 bits of budget; 3 x 4 + 2 x 2 = 16 > 15
  const fs::path f = temp_file("budgets.yaml");
  std::ofstream(f) << budgets_yaml(a, p, "test");
  kv::KvCacheConfig c;
  c.budget_file = f;
  const kv::PageGeometry g{4, 64, 16};
  const auto budgets = kv::resolve_layer_budgets(c, 5, g);
  for (int l = 0; l < 5; ++l) {
    CHECK(budgets[l] == kv::pages_for_uniform(c, g, 4096, a.bits[l]) * kv::page_bytes(g));
  }
}

TEST_CASE("calibrate allocate: a sensitivity file round-trips; bad ones are clear errors",
          "[calibrate]") {
  Sensitivity s;
  s.bits = {8, 4};
  s.k[8] = {0.1, 0.2};
  s.k[4] = {0.3, 0.4};
  s.v = s.k;
  const Sensitivity back = parse_sensitivity_json(sensitivity_to_json(s, ""), "sens.json");
  CHECK(back.bits == s.bits);
  CHECK(back.k == s.k);
  auto error_of = [](const std::string& text) -> std::string {
    try {
      (void)parse_sensitivity_json(text, "sens.json");
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "";
  };
  CHECK_THAT(error_of("[1]"), Catch::Contains("sens.json: not a JSON object"));
  CHECK_THAT(error_of("{\"bits\": "), Catch::Contains("not valid JSON"));
  // nlohmann's parser throws out_of_range for 1e400 even with exceptions off; it escaped once.
  CHECK_THAT(error_of("{\"bits\": [1e400]}"), Catch::Contains("not valid JSON"));
}

TEST_CASE("calibrate: folded key scales leave full-precision logits unchanged", "[calibrate]") {
  for (const char* name : {"llama_gqa", "qwen2_bias_tied"}) {
    LocalModel plain = LocalModel::open(golden(name));
    LocalModel folded = LocalModel::open(golden(name));
    const auto& cfg = plain.config;
    std::mt19937 rng(9);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    PerLayer scales;
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      std::vector<float> m(cfg.num_kv_heads * cfg.head_dim / 2);
      for (float& x : m)
        x = std::exp(u(rng));  // maxima spanning e^-2 .. e^2
      scales.push_back(
          scales_from_maxima(m, int32_t(cfg.num_kv_heads), int32_t(cfg.head_dim), 1.0));
    }
    folded.cpu_backend(600).fold_key_scales(scales);
    const std::vector<int32_t> ids = golden_prompt(name);
    const auto a = forward_sample(plain, ids, 1, true);
    const auto b = forward_sample(folded, ids, 1, true);
    double max_diff = 0;
    for (size_t i = 0; i < a.size(); ++i)
      max_diff = std::max(max_diff, double(std::abs(a[i] - b[i])));
    INFO(name << ": max |logit diff| " << max_diff);
    CHECK(max_diff < 2e-4);  // fp32 rounding of the scaled weights only
  }
}

TEST_CASE("calibrate: sensitivity and key scales are deterministic for a seed", "[calibrate]") {
  LocalModel model = LocalModel::open(golden("llama31_rope"));
  const std::vector<int32_t> tokens = golden_prompt("llama31_rope");
  const CalibrationSet data = make_calibration_set(tokens, {3, 64, 256, 7});
  CHECK(data.stretch == 4);
  const CalibrationSet again = make_calibration_set(tokens, {3, 64, 256, 7});
  CHECK(data.samples == again.samples);
  SensitivityOptions o;
  o.bits = {8, 4, 2};
  const Sensitivity s1 = measure_sensitivity(model, data, o);
  const Sensitivity s2 = measure_sensitivity(model, data, o);
  CHECK(s1.k == s2.k);
  CHECK(s1.v == s2.v);
  // coarser bits cost more, summed over layers
  double k8 = 0, k4 = 0, k2 = 0;
  for (int l = 0; l < s1.num_layers(); ++l) {
    k8 += s1.k.at(8)[l];
    k4 += s1.k.at(4)[l];
    k2 += s1.k.at(2)[l];
  }
  CHECK(k8 < k4);
  CHECK(k4 < k2);
  // key scales: deterministic, file round trip, never worse than no scaling
  const PerLayer m1 = measure_key_maxima(model, data);
  CHECK(m1 == measure_key_maxima(model, data));
  RepScaleOptions ro;
  ro.grid = 5;
  const RepScales r = search_rep_scales(model, data, m1, ro);
  for (size_t l = 0; l < r.alpha.size(); ++l)
    CHECK(r.mse_scaled[l] <= r.mse_plain[l]);
  const fs::path f = temp_file("key_scales.safetensors");
  write_key_scales(f, r, model.config);
  CHECK(read_key_scales(f, model.config) == r.scales);
  const fs::path fm = temp_file("key_max.safetensors");
  write_key_maxima(fm, m1, model.config);
  CHECK(read_key_maxima(fm, model.config) == m1);
}
