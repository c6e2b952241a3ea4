// `pmkv serve` configuration: the compiled-in defaults, --config merging, --set overrides, and
// errors that name the full key.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "engine/common/error.h"
#include "server/config.h"

using namespace pmkv;
using Catch::Matchers::Contains;

namespace {

ServerConfig parse(const std::string& yaml, const std::vector<std::string>& sets = {}) {
  return parse_server_config(yaml, "test.yaml", sets);
}

void check_error(const std::string& yaml, const std::vector<std::string>& sets,
                 const std::string& message) {
  INFO(yaml);
  CHECK_THROWS_WITH(parse(yaml, sets), Contains(message));
  CHECK_THROWS_AS(parse(yaml, sets), InvalidArgument);
}

}  // namespace

TEST_CASE("server config: the defaults of config/default.yaml", "[config]") {
  const ServerConfig c = parse_server_config(std::nullopt, "none", {});
  CHECK(c.model.path == "models/pmkv-ref");
  CHECK(c.model.served_name.empty());
  CHECK(c.server.host == "0.0.0.0");
  CHECK(c.server.port == 8000);
  CHECK(c.server.grpc_port == 50051);
  CHECK_FALSE(c.server.api_key.has_value());
  CHECK(c.server.max_body_bytes == 8 << 20);
  CHECK(c.server.max_n == 16);
  CHECK(c.server.request_timeout_s == 0);
  CHECK(c.server.shutdown_grace_s == 30);
  CHECK(c.scheduler.max_running == 256);
  CHECK(c.scheduler.max_step_tokens == 2048);
  CHECK(c.scheduler.prefill_chunk == 512);
  CHECK(c.scheduler.max_waiting == 4096);
  CHECK(c.scheduler.admission == SchedulerConfig::Admission::kGuaranteed);
  CHECK(c.engine.device == Device::kAuto);
  CHECK(c.engine.cuda_graphs);
  CHECK_FALSE(c.model.dummy_weights);
  CHECK(c.kv_memory_bytes == 256ll << 20);
  CHECK(c.kv_cache.page_bytes == 0);
  CHECK(c.kv_cache.bit_ladder == std::vector<int32_t>{16, 8, 4, 2});
  CHECK(c.kv_cache.window_tokens == 128);
  CHECK_FALSE(c.kv_cache.per_layer_bytes.has_value());
  CHECK_FALSE(c.kv_cache.key_scales.has_value());
  CHECK(c.engine.threads == 0);
  CHECK(c.engine.max_model_len == 0);
  CHECK(c.logging.level == "info");
  CHECK(c.logging.access_log);
  // The defaults equal the engine's own.
  const EngineOptions o = c.engine_options();
  const EngineOptions d;
  CHECK(o.kv_memory_bytes == d.kv_memory_bytes);
  CHECK(o.scheduler.max_running == d.scheduler.max_running);
  CHECK(o.kv.sink_tokens == d.kv.sink_tokens);
  CHECK(o.kv.floor_bits == d.kv.floor_bits);
  CHECK(o.cuda_graphs == d.cuda_graphs);
  CHECK_FALSE(parse("", {"engine.cuda_graphs=false"}).engine_options().cuda_graphs);
  CHECK(o.async_steps == EngineOptions::AsyncSteps::kAuto);
  CHECK(parse("", {"engine.async_steps=on"}).engine_options().async_steps ==
        EngineOptions::AsyncSteps::kOn);
  CHECK(parse("engine: {async_steps: off}", {}).engine_options().async_steps ==
        EngineOptions::AsyncSteps::kOff);
}

TEST_CASE("server config: a file merges over the defaults, --set over the file", "[config]") {
  const ServerConfig c = parse(R"(
server:
  port: 9000
  api_key: secret
scheduler:
  admission: overcommit
kv_cache:
  memory: 1G
  budget: {uniform_bits: 4, max_len: 4096}
logging:
)",
                               {"scheduler.max_running=64", "kv_cache.bit_ladder=[16, 8, 4]",
                                "kv_cache.floor_bits=4", "server.port=0", "model.served_name=m"});
  CHECK(c.server.port == 0);
  CHECK(c.server.grpc_port == 50051);  // untouched
  CHECK(c.server.api_key == "secret");
  CHECK(c.scheduler.admission == SchedulerConfig::Admission::kOvercommit);
  CHECK(c.scheduler.max_running == 64);
  CHECK(c.scheduler.prefill_chunk == 512);
  CHECK(c.kv_memory_bytes == 1ll << 30);
  CHECK(c.kv_cache.uniform_bits == 4);
  CHECK(c.kv_cache.uniform_max_len == 4096);
  CHECK(c.kv_cache.bit_ladder == std::vector<int32_t>{16, 8, 4});
  CHECK(c.kv_cache.floor_bits == 4);
  CHECK(c.kv_cache.hold_prompt);  // the default
  CHECK_FALSE(parse("kv_cache: {hold_prompt: false}", {}).kv_cache.hold_prompt);
  CHECK(c.model.served_name == "m");
  CHECK(c.logging.level == "info");  // an empty section changes nothing
}

TEST_CASE("server config: unknown keys and bad values name the full key", "[config]") {
  check_error(
      "", {"scheduler.max_running=x"},
      "config error: scheduler.max_running: expected an integer in [1, 1073741824], got 'x'");
  check_error("scheduler: {max_running: 0}", {}, "config error: scheduler.max_running:");
  check_error("scheduler: {max_runing: 3}", {}, "config error: scheduler.max_runing: unknown key");
  check_error("", {"scheduler.admission=sometimes"},
              "config error: scheduler.admission: expected one of guaranteed, overcommit");
  check_error("", {"engine.device=gpu"}, "config error: engine.device: expected one of");
  check_error("", {"engine.cuda_graphs=sometimes"},
              "config error: engine.cuda_graphs: expected true or false, got 'sometimes'");
  check_error("", {"engine.async_steps=yes"},
              "config error: engine.async_steps: expected one of auto, off, on");
  check_error("", {"model.load_format=gguf"}, "config error: model.load_format: expected one of");
  check_error("serve: {port: 1}", {}, "config error: serve: unknown section");
  check_error("server: {port: 70000}", {}, "config error: server.port: expected a port number");
  check_error("server: {max_body_bytes: 12Q}", {}, "config error: server.max_body_bytes:");
  check_error("server: {shutdown_grace_s: -1}", {}, "config error: server.shutdown_grace_s:");
  // Beyond 10^7 s a deadline could wrap steady_clock: 9223372036 s cancelled every request at once.
  check_error(
      "", {"server.request_timeout_s=9223372036"},
      "config error: server.request_timeout_s: expected a number of seconds in [0, 10000000]");
  check_error("", {"server.shutdown_grace_s=1e300"}, "config error: server.shutdown_grace_s:");
  CHECK(parse_server_config(std::nullopt, "test", {"server.request_timeout_s=10000000"})
            .server.request_timeout_s == 1e7);
  check_error("logging: {access_log: maybe}", {},
              "config error: logging.access_log: expected true or false, got 'maybe'");
  check_error("kv_cache: {memory: lots}", {}, "config error: kv_cache.memory: expected a byte");
  check_error("kv_cache: {init_bits: x}", {}, "config error: kv_cache.init_bits:");
  check_error("kv_cache: {pages: 3}", {}, "config error: kv_cache.pages: unknown key");
  check_error("", {"kv_cache.hold_prompt=later"},
              "config error: kv_cache.hold_prompt: expected true or false, got 'later'");
  check_error("", {"kv_cache.floor_bits=3"}, "config error: kv_cache.floor_bits:");
  check_error("", {"kv_cache.budget.per_layer_bytes=1M", "kv_cache.budget.uniform_bits=4"},
              "config error: kv_cache.budget:");
  check_error("", {"engine.threads=-2"},
              "config error: engine.threads: expected an integer in [0, 4096]");
  // The range is in the message: "expected an integer >= 0, got '2147483647'" read as nonsense.
  check_error("", {"engine.max_model_len=2147483647"},
              "config error: engine.max_model_len: expected an integer in [0, 1073741824], got");
  check_error("", {"nonsense"}, "--set 'nonsense': expected section.key=value");
  check_error("server: [1, 2]", {}, "config error: server: expected a mapping");
  check_error("server: {port: [1}", {}, "not valid YAML");
}

TEST_CASE("server config: budgets and key scales files are relative to the config file",
          "[config]") {
  const auto dir = std::filesystem::temp_directory_path() / "pmkv_test_server_config";
  std::filesystem::create_directories(dir);
  {
    std::ofstream(dir / "serve.yaml")
        << "kv_cache:\n  key_scales: scales.safetensors\n  budget:\n    file: budgets.yaml\n";
  }
  const ServerConfig c = load_server_config(dir / "serve.yaml", {});
  REQUIRE(c.kv_cache.budget_file.has_value());
  CHECK(*c.kv_cache.budget_file == dir / "budgets.yaml");
  REQUIRE(c.kv_cache.key_scales.has_value());
  CHECK(*c.kv_cache.key_scales == dir / "scales.safetensors");
  CHECK_THROWS_AS(load_server_config(dir / "missing.yaml", {}), InvalidArgument);
  std::filesystem::remove_all(dir);
}
