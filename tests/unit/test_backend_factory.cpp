// Backend selection (--device, engine.device) and the dummy load format, on any machine: with no
// GPU, auto means cpu and cuda is a clear error; the CUDA paths themselves are tested by
// tests/gpu on the device machine.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include "engine/backend/backend_factory.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/common/error.h"
#include "engine/kv/kv_config.h"
#include "engine/model/model_config.h"
#include "engine/model/weight_store.h"
#include "engine/runtime/local_model.h"

using namespace pmkv;
namespace fs = std::filesystem;

namespace {

fs::path golden(const char* name) {
  return fs::path(PMKV_SOURCE_DIR) / "tests/fixtures/golden" / name;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("backend factory: device names", "[backend]") {
  CHECK(parse_device("auto") == Device::kAuto);
  CHECK(parse_device("cpu") == Device::kCpu);
  CHECK(parse_device("cuda") == Device::kCuda);
  CHECK(std::string(device_name(Device::kCuda)) == "cuda");
  CHECK(message_of([] { parse_device("gpu", "engine.device"); }) ==
        "engine.device: 'gpu' is not one of auto, cpu, cuda");
  CHECK(resolve_device(Device::kCpu) == Device::kCpu);
}

TEST_CASE("backend factory: auto and cuda follow the hardware", "[backend]") {
  if (cuda_available()) {
    CHECK(resolve_device(Device::kAuto) == Device::kCuda);
    CHECK(resolve_device(Device::kCuda) == Device::kCuda);
  } else {
    CHECK(resolve_device(Device::kAuto) == Device::kCpu);
    const std::string m = message_of([] { resolve_device(Device::kCuda); });
    CHECK(m.find("device cuda:") == 0);
    CHECK(m.find("use --device cpu") != std::string::npos);
  }
}

TEST_CASE("backend factory: auto runs a shape the CUDA kernels do not take on the cpu",
          "[backend]") {
  const ModelConfig small = parse_model_config(golden("llama_gqa") / "config.json");  // head_dim 16
  std::string why;
  CHECK_FALSE(cuda_supports(small, &why));
  CHECK(why.find("head_dim 16") == 0);
  CHECK(cuda_supports(parse_model_config(golden("mistral_swa_d128") / "config.json")));
  CHECK(choose_device(Device::kAuto, small) == Device::kCpu);
  CHECK(choose_device(Device::kCpu, small) == Device::kCpu);
  const std::string m = message_of([&] { choose_device(Device::kCuda, small); });
  CHECK(m.find("device cuda:") == 0);
  CHECK(m.find("--device cpu") != std::string::npos);
}

TEST_CASE("backend factory: cpu backend with key scales, dummy weights refused on cpu",
          "[backend]") {
  const fs::path dir = golden("llama_gqa_d64");
  const ModelConfig cfg = parse_model_config(dir / "config.json");
  const WeightStore w = WeightStore::open(dir);
  const kv::PageGeometry g{int32_t(cfg.num_kv_heads), int32_t(cfg.head_dim), 16};
  auto b = make_backend({.device = Device::kCpu}, cfg, &w, g, 64, {});
  CHECK(b->name() == "cpu");
  // A pool beyond the memory available is a clear error naming the setting (it was a bare
  // std::bad_alloc, or the OOM killer): 2^30 pages of this model are terabytes.
  CHECK(message_of([&] {
          make_backend({.device = Device::kCpu}, cfg, &w, g, 1 << 30, {});
        }).find("kv_cache.memory) is larger than the memory this machine has available") !=
        std::string::npos);
  CHECK_FALSE(b->samples_on_device());
  CHECK(b->weight_bytes() > 0);
  CHECK(b->kv_pool_bytes() == 64 * kv::page_bytes(g));
  // Wrong-shaped key scales name the layer count.
  const std::vector<std::vector<float>> bad(1, std::vector<float>(cfg.kv_width(), 1.0f));
  CHECK(message_of([&] {
          make_backend({.device = Device::kCpu}, cfg, &w, g, 64, bad);
        }).find("key scales") == 0);
  CHECK(message_of([&] {
          make_backend({.device = Device::kCpu, .dummy_weights = true}, cfg, nullptr, g, 64, {});
        }).find("only the cuda device supports random weights") != std::string::npos);
  // A dummy LocalModel opens without weight files (they are only needed by the backend).
  LocalModel m = LocalModel::open(dir, {.device = Device::kCpu, .dummy_weights = true});
  CHECK(m.weights.empty());
  CHECK_THROWS_AS(m.backend(64), InvalidArgument);
}

TEST_CASE("local model: generation_config.json's EOS ids are checked when there is no tokenizer",
          "[backend]") {
  const fs::path dir = fs::temp_directory_path() / "pmkv_test_generation_config";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(golden("llama_gqa") / "config.json", dir / "config.json");
  const int64_t vocab = parse_model_config(dir / "config.json").vocab_size;
  auto open_with = [&](const std::string& text) {
    std::ofstream(dir / "generation_config.json") << text;
    return LocalModel::open(dir, {.device = Device::kCpu, .dummy_weights = true});
  };
  auto error_of = [&](const std::string& text) -> std::string {
    try {
      (void)open_with(text);
    } catch (const LoadError& e) {
      return e.what();
    }
    return "";
  };
  const LocalModel m = open_with(R"({"eos_token_id": [2, 3]})");
  CHECK(std::find(m.eos_ids.begin(), m.eos_ids.end(), 3) != m.eos_ids.end());
  CHECK_THAT(error_of("[2]"), Catch::Contains("is not a JSON object"));
  CHECK_THAT(error_of(R"({"eos_token_id": 2)"), Catch::Contains("is not valid JSON"));
  // 1e400: out_of_range from the parser, which once escaped as std::terminate.
  CHECK_THAT(error_of(R"({"eos_token_id": 1e400})"), Catch::Contains("is not valid JSON"));
  for (const std::string& id : {std::string("-1"), std::to_string(vocab), std::string("4294967298"),
                                std::string("18446744073709551615"), std::string("2.5")}) {
    INFO(id);
    CHECK_THAT(error_of(R"({"eos_token_id": )" + id + "}"), Catch::Contains("must be a token id"));
  }
  fs::remove_all(dir);
}
