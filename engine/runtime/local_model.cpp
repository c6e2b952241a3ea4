#include "engine/runtime/local_model.h"

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>

#include "engine/calibrate/key_scales.h"
#include "engine/common/error.h"

namespace pmkv {

namespace {

// eos_token_id of generation_config.json (int or list), when the file exists; every id in
// [0, vocab_size).
std::vector<int32_t> generation_config_eos(const std::filesystem::path& dir, int64_t vocab_size) {
  const std::filesystem::path file = dir / "generation_config.json";
  std::ifstream in(file);
  if (!in) return {};
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {  // out_of_range too: a number beyond a double
    throw LoadError(file.string() + " is not valid JSON: " + e.what());
  }
  const auto bad = [&] {
    return LoadError(file.string() + ": eos_token_id must be a token id in [0, " +
                     std::to_string(vocab_size) + ") or a list of them");
  };
  const auto id_of = [&](const nlohmann::json& v) {
    if (!v.is_number_integer()) throw bad();
    const int64_t id =
        v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX ? -1 : v.get<int64_t>();
    if (id < 0 || id >= vocab_size) throw bad();
    return static_cast<int32_t>(id);
  };
  if (!j.is_object()) throw LoadError(file.string() + " is not a JSON object");
  std::vector<int32_t> ids;
  const auto it = j.find("eos_token_id");
  if (it == j.end() || it->is_null()) return ids;
  if (it->is_array()) {
    for (const auto& v : *it)
      ids.push_back(id_of(v));
  } else {
    ids.push_back(id_of(*it));
  }
  return ids;
}

}  // namespace

LocalModel::LocalModel(ModelConfig c, WeightStore w, LocalModelOptions o)
    : config(std::move(c)), weights(std::move(w)), options_(std::move(o)) {
  options_.kv.validate();
  options_.device = choose_device(options_.device, config);
  geometry_ = kv::resolve_geometry(options_.kv, static_cast<int32_t>(config.num_kv_heads),
                                   static_cast<int32_t>(config.head_dim));
  budgets_ =
      kv::resolve_layer_budgets(options_.kv, static_cast<int32_t>(config.num_layers), geometry_);
  if (options_.kv.key_scales) {
    key_scales_ = calibrate::read_key_scales(*options_.kv.key_scales, config);
  }
}

LocalModel LocalModel::open(const std::filesystem::path& dir, LocalModelOptions options) {
  if (!std::filesystem::is_directory(dir)) {
    throw LoadError("model directory " + dir.string() + " does not exist");
  }
  const bool dummy = options.dummy_weights;
  LocalModel m(parse_model_config(dir / "config.json"),
               dummy ? WeightStore::none(dir) : WeightStore::open(dir), options);
  if (Tokenizer::available(dir)) {
    m.tokenizer = Tokenizer::load(dir);
    m.eos_ids = m.tokenizer->eos_ids();
  } else {
    m.eos_ids = m.config.eos_token_ids;
    for (int32_t id : generation_config_eos(dir, m.config.vocab_size)) {
      if (std::find(m.eos_ids.begin(), m.eos_ids.end(), id) == m.eos_ids.end()) {
        m.eos_ids.push_back(id);
      }
    }
  }
  return m;
}

void LocalModel::ensure_capacity(int64_t tokens) {
  if (backend_ && tokens <= capacity_tokens_) return;
  const kv::PageGeometry& g = geometry_;
  // `tokens` counts every sequence's tokens plus a page of slack each; at 16 bits (the most pages
  // a token can take) plus the transient pages of a step's flushes (a window's worth per layer).
  const int64_t pages_per_layer =
      (tokens + g.tokens16 - 1) / g.tokens16 + options_.kv.window_tokens / g.tokens16 + 2;
  const int64_t num_pages = pages_per_layer * config.num_layers;
  kv_.reset();
  backend_.reset();
  backend_ = make_backend({.device = options_.device,
                           .num_threads = options_.num_threads,
                           .dummy_weights = options_.dummy_weights},
                          config, &weights, g, static_cast<int32_t>(num_pages), key_scales_);
  kv_ =
      std::make_unique<kv::KvCacheManager>(static_cast<int32_t>(config.num_layers), g,
                                           static_cast<int32_t>(num_pages), options_.kv, budgets_);
  capacity_tokens_ = tokens;
  spdlog::debug("KV pool: {} pages of {} bytes ({} MiB)", num_pages, kv::page_bytes(g),
                backend_->kv_pool_bytes() >> 20);
}

std::vector<GenerationResult> LocalModel::generate(std::span<const GenerationRequest> requests,
                                                   const Generator::OnText& on_text) {
  const int64_t context = config.max_position_embeddings;
  std::vector<GenerationRequest> capped(requests.begin(), requests.end());
  int64_t tokens = 0;
  for (size_t i = 0; i < capped.size(); ++i) {
    GenerationRequest& r = capped[i];
    const int64_t prompt = static_cast<int64_t>(r.prompt_ids.size());
    if (context > 0 && prompt >= context) {
      throw InvalidArgument("prompt " + std::to_string(i) + " has " + std::to_string(prompt) +
                            " tokens; the model's context is " + std::to_string(context) +
                            " tokens, so at most " + std::to_string(context - 1) + " fit");
    }
    if (context > 0) {
      r.params.max_tokens =
          static_cast<int32_t>(std::min<int64_t>(r.params.max_tokens, context - prompt));
    }
    // Per sequence: its tokens plus partly filled sink, body and window pages.
    tokens += prompt + r.params.max_tokens + 3 * geometry_.tokens16;
  }
  ensure_capacity(tokens);
  Generator gen(*backend_, *kv_, tokenizer ? &*tokenizer : nullptr, eos_ids, {});
  auto results = gen.run(capped, on_text);
  timings_ = gen.timings();
  return results;
}

PerplexityResult LocalModel::perplexity(std::span<const int32_t> tokens,
                                        PerplexityOptions options) {
  if (config.max_position_embeddings > 0) {
    options.window =
        static_cast<int32_t>(std::min<int64_t>(options.window, config.max_position_embeddings));
  }
  ensure_capacity(options.window + 3 * geometry_.tokens16);
  return evaluate_perplexity(*backend_, *kv_, tokens, options);
}

Backend& LocalModel::backend(int64_t tokens) {
  ensure_capacity(tokens);
  return *backend_;
}

CpuBackend& LocalModel::cpu_backend(int64_t tokens) {
  ensure_capacity(tokens);
  auto* cpu = dynamic_cast<CpuBackend*>(backend_.get());
  if (cpu == nullptr) {
    throw InvalidArgument(std::string("this needs the cpu device (it probes the CPU backend); "
                                      "the model runs on ") +
                          device_name(options_.device));
  }
  return *cpu;
}

kv::KvCacheManager& LocalModel::kv_manager(int64_t tokens) {
  ensure_capacity(tokens);
  return *kv_;
}

}  // namespace pmkv
