#pragma once
// Picks and builds the backend a model runs on: `--device cpu|cuda|auto` (engine.device in the
// YAML config). auto is cuda when this build has CUDA and a GPU is present, else cpu; asking for
// cuda without one is an InvalidArgument that says so.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/weight_store.h"
#include "kernels/kv_page_layout.h"

namespace pmkv {

enum class Device { kAuto, kCpu, kCuda };

// "auto" | "cpu" | "cuda"; InvalidArgument naming `key` otherwise.
Device parse_device(std::string_view text, std::string_view key = "device");
const char* device_name(Device d);

// True when this build has the CUDA backend and a GPU is usable.
bool cuda_available();
// auto -> cuda or cpu; cuda without a usable GPU (or without CUDA in this build) throws.
Device resolve_device(Device d);
// Whether the CUDA kernels take this model's shape (head_dim 64 or 128, at most 8 query heads per
// KV head); `why` (may be null) says what does not fit.
bool cuda_supports(const ModelConfig& config, std::string* why = nullptr);
// The device a model runs on: cpu as asked; cuda as asked (InvalidArgument when there is no GPU
// or the model's shape is not supported); auto: cuda when available and supported, else cpu (an
// info log line says why).
Device choose_device(Device requested, const ModelConfig& config);

struct BackendOptions {
  Device device = Device::kCpu;
  int32_t num_threads = 0;         // cpu: OpenMP/OpenBLAS threads; 0 = every core
  int32_t max_step_tokens = 2048;  // cuda: rows of one step the activations are planned for
  bool dummy_weights = false;      // cuda: random weights (weights may then be null)
  bool cuda_graphs = true;         // cuda: decode steps as CUDA graphs per batch bucket
  int32_t graph_max_batch = 256;   // cuda: largest decode batch run as a graph
};

// Builds the backend with its KV pool of `num_pages` pages and folds `key_scales` (may be empty).
std::unique_ptr<Backend> make_backend(const BackendOptions& options, const ModelConfig& config,
                                      const WeightStore* weights, kv::PageGeometry geometry,
                                      int32_t num_pages,
                                      const std::vector<std::vector<float>>& key_scales);

}  // namespace pmkv
