// Golden tests: our CPU engine against Hugging Face transformers on small random-weight checkpoints
// (tests/fixtures/golden/<model>/, made by tools/make_golden.py). Logits of every prompt position
// and a 32-token greedy continuation were recorded by transformers in float32 from the bf16 weights.
//
// Models: llama_gqa, qwen2_bias_tied, mistral, llama31_rope (head_dim 16-32), and llama_gqa_d64,
// qwen2_bias_tied_d64, mistral_swa_d128, llama31_rope_d64 (head_dim 64/128, group <= 8: shapes the
// CUDA kernels take; vocab 256).
//
// Bound: max |logit difference| <= 5e-4 (kLogitTolerance). Both sides compute in fp32 on the same
// bf16-rounded weights; what remains is fp32 summation order, fp32 RoPE angles at long positions and
// our 16-bit KV codes (step = range / 65535). Measured (whole-prompt prefill): <= 8.7e-6 on
// prompts of up to 60 tokens, 8.7e-5 on the 1,111-token llama31_rope prompt and 1.1e-5 on the
// 1,100-token llama31_rope_d64 one; chunked prefill, which reads earlier tokens back from the
// 16-bit KV codes: <= 3.6e-4 (llama31_rope; <= 1.9e-4 on the others). Any functional difference
// (a wrong RoPE pair, scaling, bias, norm or mask) moves logits by > 1e-2 (a sliding window off by
// one: 0.87-1.8). The recorded greedy continuations have top-2 margins >= 2.0e-3 > 2 x the bound,
// so equal tokens are a fair requirement.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/kv/kv_cache_manager.h"
#include "engine/model/model_config.h"
#include "engine/model/safetensors.h"
#include "engine/model/weight_store.h"
#include "engine/runtime/perplexity.h"
#include "engine/runtime/step_builder.h"

namespace fs = std::filesystem;
using namespace pmkv;

namespace {

constexpr double kLogitTolerance = 5e-4;

struct GoldenPrompt {
  std::string name;
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> greedy_ids;
  std::vector<float> logits;  // [prompt_len, vocab]
};

struct Golden {
  fs::path dir;
  ModelConfig config;
  std::vector<GoldenPrompt> prompts;
};

Golden load_golden(const std::string& model) {
  Golden g;
  g.dir = fs::path(PMKV_SOURCE_DIR) / "tests/fixtures/golden" / model;
  g.config = parse_model_config(g.dir / "config.json");
  std::ifstream in(g.dir / "golden.json");
  REQUIRE(in.good());
  const auto j = nlohmann::json::parse(in);
  const auto logits = SafetensorsFile::open(g.dir / j.at("logits_file").get<std::string>());
  for (const auto& p : j.at("prompts")) {
    GoldenPrompt gp;
    gp.name = p.at("name").get<std::string>();
    gp.prompt_ids = p.at("prompt_ids").get<std::vector<int32_t>>();
    gp.greedy_ids = p.at("greedy_ids").get<std::vector<int32_t>>();
    const SafetensorsTensor* t = logits.find(gp.name);
    REQUIRE(t != nullptr);
    REQUIRE(t->dtype == DType::kF32);
    REQUIRE(t->shape == std::vector<int64_t>{int64_t(gp.prompt_ids.size()), g.config.vocab_size});
    gp.logits.resize(t->num_bytes() / 4);
    std::memcpy(gp.logits.data(), logits.data(*t).data(), t->num_bytes());
    g.prompts.push_back(std::move(gp));
  }
  return g;
}

struct Engine {
  ModelConfig cfg;
  WeightStore weights;
  kv::KvCacheManager kv;
  CpuBackend backend;
  Engine(const Golden& g, int32_t tokens16, int32_t num_pages)
      : cfg(g.config),
        weights(WeightStore::open(g.dir)),
        kv(int32_t(cfg.num_layers), geometry(cfg, tokens16), num_pages, kv_config()),
        backend(cfg, weights, geometry(cfg, tokens16), num_pages) {}
  static kv::KvCacheConfig kv_config() {
    kv::KvCacheConfig c;
    c.window_tokens = 16;  // a multiple of every page size used here
    return c;
  }
  static kv::PageGeometry geometry(const ModelConfig& c, int32_t tokens16) {
    return {int32_t(c.num_kv_heads), int32_t(c.head_dim), tokens16};
  }
  std::vector<float> step(std::span<const SeqChunk> chunks, int64_t* rows_out = nullptr) {
    auto b = build_step(kv, chunks);
    REQUIRE(b.has_value());
    std::vector<float> logits(b->logit_rows.size() * cfg.vocab_size);
    backend.forward(*b, logits);
    kv.end_step();
    if (rows_out) *rows_out = int64_t(b->logit_rows.size());
    return logits;
  }
};

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE(std::isfinite(a[i]));
    m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  }
  return m;
}

int32_t argmax(std::span<const float> v) {
  return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

// The *_d64 / *_d128 fixtures have shapes the CUDA kernels take (head_dim 64 or 128, group <= 8).
const char* const kModels[] = {"llama_gqa",        "qwen2_bias_tied", "mistral",
                               "llama31_rope",     "llama_gqa_d64",   "qwen2_bias_tied_d64",
                               "mistral_swa_d128", "llama31_rope_d64"};

}  // namespace

TEST_CASE("golden: whole-prompt prefill logits match transformers", "[golden]") {
  const std::string model = GENERATE(from_range(std::begin(kModels), std::end(kModels)));
  const Golden g = load_golden(model);
  Engine e(g, 16, 4096);
  for (size_t p = 0; p < g.prompts.size(); ++p) {
    const auto& gp = g.prompts[p];
    const SeqChunk c{p, gp.prompt_ids, SeqChunk::Logits::kAll};
    const auto logits = e.step({&c, 1});
    const double d = max_abs_diff(logits, gp.logits);
    WARN(model << " " << gp.name << " (" << gp.prompt_ids.size() << " tokens): max |diff| " << d);
    CHECK(d <= kLogitTolerance);
  }
}

TEST_CASE("golden: all prompts batched in one step give the same logits", "[golden]") {
  const std::string model = GENERATE(from_range(std::begin(kModels), std::end(kModels)));
  const Golden g = load_golden(model);
  Engine e(g, 16, 4096);
  std::vector<SeqChunk> chunks;
  size_t total = 0;
  for (size_t p = 0; p < g.prompts.size(); ++p) {
    chunks.push_back({100 + p, g.prompts[p].prompt_ids, SeqChunk::Logits::kAll});
    total += g.prompts[p].prompt_ids.size();
  }
  const auto logits = e.step(chunks);
  REQUIRE(logits.size() == total * g.config.vocab_size);
  size_t off = 0;
  for (const auto& gp : g.prompts) {
    const std::span<const float> mine(logits.data() + off, gp.logits.size());
    const double d = max_abs_diff(mine, gp.logits);
    INFO(model << " " << gp.name << ": max |diff| " << d);
    CHECK(d <= kLogitTolerance);
    off += gp.logits.size();
  }
}

TEST_CASE("golden: chunked prefill then greedy decode reproduces transformers' tokens",
          "[golden]") {
  const std::string model = GENERATE(from_range(std::begin(kModels), std::end(kModels)));
  const Golden g = load_golden(model);
  // Small pages (4 tokens) so tables span many pages; prompts arrive in chunks of 7 tokens, and
  // all prompts decode together in one batch.
  Engine e(g, 4, 8192);
  const int64_t V = g.config.vocab_size;
  const size_t P = g.prompts.size();
  std::vector<std::vector<int32_t>> generated(P);
  std::vector<int32_t> last(P);
  for (size_t p = 0; p < P; ++p) {
    const auto& ids = g.prompts[p].prompt_ids;
    for (size_t pos = 0; pos < ids.size(); pos += 7) {
      const size_t n = std::min<size_t>(7, ids.size() - pos);
      const SeqChunk c{p, std::span(ids).subspan(pos, n), SeqChunk::Logits::kAll};
      const auto logits = e.step({&c, 1});
      const std::span<const float> want(g.prompts[p].logits.data() + pos * V, n * V);
      const double d = max_abs_diff(logits, want);
      INFO(model << " " << g.prompts[p].name << " chunk at " << pos << ": max |diff| " << d);
      REQUIRE(d <= kLogitTolerance);
      if (pos + n == ids.size()) last[p] = argmax(std::span(logits).subspan((n - 1) * V, V));
    }
  }
  const size_t steps = g.prompts[0].greedy_ids.size();
  for (size_t t = 0; t < steps; ++t) {
    std::vector<SeqChunk> chunks;
    for (size_t p = 0; p < P; ++p) {
      generated[p].push_back(last[p]);
      chunks.push_back({p, std::span(&last[p], 1), SeqChunk::Logits::kLast});
    }
    const auto logits = e.step(chunks);
    for (size_t p = 0; p < P; ++p) last[p] = argmax(std::span(logits).subspan(p * V, V));
  }
  for (size_t p = 0; p < P; ++p) {
    INFO(model << " " << g.prompts[p].name);
    CHECK(generated[p] == g.prompts[p].greedy_ids);
    e.kv.release(p);
  }
  CHECK(e.kv.pool().num_used() == 0);
}

TEST_CASE("golden: evaluate_perplexity equals the NLL of transformers' logits", "[golden]") {
  const Golden g = load_golden("llama31_rope");
  Engine e(g, 16, 4096);
  const auto& gp = g.prompts.back();  // the 1,111-token prompt
  const int64_t V = g.config.vocab_size;
  // Two windows (the second starts from an empty cache) fed in chunks of 100 tokens.
  const int32_t window = 700;
  double want = 0;
  // First window: transformers' logits of positions 0..window-2 score tokens 1..window-1.
  for (int32_t i = 0; i + 1 < window; ++i) {
    const std::span<const float> row(gp.logits.data() + i * V, V);
    double m = -INFINITY, s = 0;
    for (float x : row) m = std::max(m, double(x));
    for (float x : row) s += std::exp(double(x) - m);
    want -= double(row[gp.prompt_ids[i + 1]]) - m - std::log(s);
  }
  PerplexityOptions opt;
  opt.window = window;
  opt.chunk = 100;
  const std::span<const int32_t> first(gp.prompt_ids.data(), window);
  const PerplexityResult r = evaluate_perplexity(e.backend, e.kv, first, opt);
  CHECK(r.windows == 1);
  CHECK(r.predicted == window - 1);
  CHECK(r.nll == Approx(want).epsilon(1e-5));
  CHECK(e.kv.pool().num_used() == 0);
  // The whole prompt as two windows: the second is scored from an empty cache, so its NLL equals
  // a separate evaluation of just those tokens.
  opt.window = window;
  const PerplexityResult both = evaluate_perplexity(e.backend, e.kv, gp.prompt_ids, opt);
  const PerplexityResult second = evaluate_perplexity(
      e.backend, e.kv, std::span(gp.prompt_ids).subspan(window), opt);
  CHECK(both.windows == 2);
  CHECK(both.predicted == int64_t(gp.prompt_ids.size()) - 2);
  CHECK(both.nll == Approx(r.nll + second.nll).epsilon(1e-9));
}
