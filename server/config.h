#pragma once
// The configuration of `pmkv serve`: config/default.yaml (compiled in), merged with an optional
// --config file, then `--set a.b=c` overrides. Every key is documented in config/default.yaml.
// Errors are InvalidArgument "config error: <section.key>: <what>", raised at start-up.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/kv/kv_config.h"
#include "engine/serving/serving_engine.h"

namespace pmkv {

struct ServerConfig {
  struct Model {
    std::filesystem::path path;
    std::string served_name;     // empty: the directory's name
    bool dummy_weights = false;  // load_format: dummy (random weights; cuda only)
  } model;
  struct Server {
    std::string host;
    uint16_t port = 0;
    uint16_t grpc_port = 0;
    std::optional<std::string> api_key;
    int64_t max_body_bytes = 0;
    int32_t max_n = 0;
    int32_t io_threads = 0;
    double request_timeout_s = 0;  // 0 = none
    double shutdown_grace_s = 0;
  } server;
  SchedulerConfig scheduler;
  kv::KvCacheConfig kv_cache;   // parsed by kv::parse_kv_config_yaml (all keys but `memory`)
  int64_t kv_memory_bytes = 0;  // kv_cache.memory
  struct Engine {
    int32_t threads = 0;
    int32_t max_model_len = 0;
    Device device = Device::kAuto;  // auto: cuda when a GPU is present
    bool cuda_graphs = true;        // cuda: decode steps replay CUDA graphs
    EngineOptions::AsyncSteps async_steps = EngineOptions::AsyncSteps::kAuto;
  } engine;
  struct Logging {
    std::string level;
    bool access_log = true;
  } logging;

  EngineOptions engine_options() const;
};

// The text of config/default.yaml as compiled into the binary.
std::string_view default_config_yaml();

// Defaults, then `file` (when given; relative kv_cache.budget.file paths in it are relative to
// its directory), then each "section.key=value" of `overrides` in order.
ServerConfig load_server_config(const std::optional<std::filesystem::path>& file,
                                const std::vector<std::string>& overrides);
// The same over YAML text instead of a file (`source` names it in errors): for tests.
ServerConfig parse_server_config(const std::optional<std::string>& yaml_text,
                                 const std::string& source,
                                 const std::vector<std::string>& overrides);

}  // namespace pmkv
