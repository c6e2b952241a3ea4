#pragma once
// LocalModel: a model directory opened for in-process use (`pmkv generate`, `pmkv eval`, tests):
// config, memory-mapped weights, the tokenizer when the directory has one, and a CPU backend with
// a KV pool sized for the requests it is asked to run.
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "engine/backend/backend_factory.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/kv/kv_cache_manager.h"
#include "engine/model/model_config.h"
#include "engine/model/weight_store.h"
#include "engine/runtime/generator.h"
#include "engine/runtime/perplexity.h"
#include "engine/tokenizer/tokenizer.h"

namespace pmkv {

struct LocalModelOptions {
  int32_t num_threads = 0;       // 0: every core
  Device device = Device::kCpu;  // the CLI and server default to auto (cuda when a GPU is present)
  // Random weights of the config's shape instead of the checkpoint (vLLM's --load-format dummy;
  // cuda only): benchmarks and smoke tests of a real shape without its file.
  bool dummy_weights = false;
  kv::KvCacheConfig kv;  // page size, bit ladder, sink/window, policy, budgets, key scales
};

class LocalModel {
 public:
  static LocalModel open(const std::filesystem::path& dir, LocalModelOptions options = {});

  ModelConfig config;
  WeightStore weights;
  std::optional<Tokenizer> tokenizer;
  std::vector<int32_t> eos_ids;  // the tokenizer's, else config.json's and generation_config's

  // Runs the requests to completion (see Generator). Rejects prompts that do not leave room for
  // one generated token in the model's context (InvalidArgument); caps max_tokens at the context.
  std::vector<GenerationResult> generate(std::span<const GenerationRequest> requests,
                                         const Generator::OnText& on_text = {});
  const GenerationTimings& timings() const { return timings_; }
  // Perplexity of the model on `tokens` (see perplexity.h); the window is capped at the context.
  PerplexityResult perplexity(std::span<const int32_t> tokens, PerplexityOptions options);
  const kv::KvCacheManager* kv() const { return kv_.get(); }
  // The backend and KV manager, sized for at least `tokens` tokens (calibration drives steps
  // itself through these; it needs the CPU backend's probes: cpu_backend() throws
  // InvalidArgument on another device).
  Backend& backend(int64_t tokens);
  CpuBackend& cpu_backend(int64_t tokens);
  // The device the backend runs on (auto resolved at open).
  Device device() const { return options_.device; }
  kv::KvCacheManager& kv_manager(int64_t tokens);
  const kv::PageGeometry& kv_geometry() const { return geometry_; }
  const std::vector<int64_t>& kv_budgets() const { return budgets_; }
  // kv_cache.key_scales, read at open ([layers][kv_width]); empty when not configured. Backends
  // made outside this class fold them with CpuBackend::fold_key_scales.
  const std::vector<std::vector<float>>& key_scales() const { return key_scales_; }

 private:
  LocalModel(ModelConfig c, WeightStore w, LocalModelOptions o);
  void ensure_capacity(int64_t tokens);

  LocalModelOptions options_;
  kv::PageGeometry geometry_;
  std::vector<int64_t> budgets_;
  std::vector<std::vector<float>> key_scales_;  // [layers][kv_width], empty = none
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<kv::KvCacheManager> kv_;
  int64_t capacity_tokens_ = 0;
  GenerationTimings timings_;
};

}  // namespace pmkv
