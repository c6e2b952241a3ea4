// `pmkv eval`: perplexity of a model (through its KV cache) on a text file.
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

#include "engine/common/error.h"
#include "engine/runtime/local_model.h"
#include "server/cli/args.h"
#include "server/cli/commands.h"

namespace pmkv::cli {

namespace {

constexpr const char* kHelp = R"(usage: pmkv eval --model DIR --text FILE [options]

Perplexity over a text file: the text is tokenized once with BOS prepended, cut into consecutive
windows of --window tokens, each evaluated from an empty KV cache (fed in chunks of --chunk tokens)
scoring positions 1..len-1; perplexity = exp(total NLL / predicted tokens). Prints one JSON object.

With --kv-config, the text is evaluated twice: with a plain 16-bit cache (the reference) and with
the given KV configuration; greedy_agreement is the fraction of scored positions where both
caches' logits have the same argmax (teacher-forced).

  --model DIR       Hugging Face model directory with tokenizer.model
  --text FILE       UTF-8 text file
  --kv-config YAML  KV cache configuration (a kv_cache section, or the section alone)
  --window N        tokens per window (default 2048; capped by the model's context)
  --chunk N         prefill chunk size (default 512; small chunks make more tokens attend to
                    cached, quantized K/V rather than to their own step's exact K/V)
  --max-tokens N    evaluate only the first N tokens of the text
  --threads N       CPU threads (default: all cores)
  --device D        auto|cpu|cuda (default auto: cuda when a GPU is present)
)";

nlohmann::json kv_summary(const kv::KvCacheConfig& c, const LocalModel& m) {
  nlohmann::json j;
  j["policy"] = kv::to_string(c.policy);
  j["init_bits"] = c.init_bits;
  j["floor_bits"] = c.floor_bits;
  j["sink_tokens"] = c.sink_tokens;
  j["window_tokens"] = c.window_tokens;
  j["page_bytes"] = kv::page_bytes(m.kv_geometry());
  j["layer_budget_bytes"] = m.kv_budgets();
  return j;
}

nlohmann::json result_json(const PerplexityResult& r) {
  nlohmann::json j;
  j["perplexity"] = r.perplexity();
  j["nll"] = r.nll;
  j["predicted"] = r.predicted;
  j["windows"] = r.windows;
  j["seconds"] = r.seconds;
  const double w = r.windows > 0 ? static_cast<double>(r.windows) : 1.0;
  j["kv_bytes_per_window_end"] = static_cast<double>(r.kv_bytes) / w;
  nlohmann::json by_bits;
  for (size_t i = 0; i < kv::kStatBits.size(); ++i) {
    by_bits[std::to_string(kv::kStatBits[i])] = static_cast<double>(r.kv_tokens_by_bits[i]) / w;
  }
  j["kv_token_layers_by_bits_per_window_end"] = by_bits;
  j["demotions"] = r.demotions;
  return j;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument("cannot read --text file " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

int run_eval(const std::vector<std::string>& argv) {
  const Args a(argv, {.flags = {"help"},
                      .values = {"model", "text", "window", "chunk", "threads", "kv-config",
                                 "max-tokens", "device"},
                      .repeatable = {}});
  if (a.flag("help")) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  const std::string text_path = a.require("text");
  PerplexityOptions opt;
  opt.window = static_cast<int32_t>(a.get_int("window").value_or(2048));
  opt.chunk = static_cast<int32_t>(a.get_int("chunk").value_or(512));
  if (opt.window < 2) throw InvalidArgument("--window must be at least 2");
  if (opt.chunk < 1) throw InvalidArgument("--chunk must be at least 1");
  const int32_t threads = static_cast<int32_t>(a.get_int("threads").value_or(0));
  const std::string model_dir = a.require("model");
  const Device device = parse_device(a.get("device").value_or("auto"), "--device");
  LocalModel reference = LocalModel::open(model_dir, {.num_threads = threads, .device = device});
  if (!reference.tokenizer) {
    throw InvalidArgument("eval needs a tokenizer (tokenizer.model) in the model directory");
  }
  const std::string text = read_file(text_path);
  std::vector<int32_t> tokens = reference.tokenizer->encode(text, /*add_bos=*/true);
  if (auto m = a.get_int("max-tokens"); m && *m >= 2 && *m < static_cast<int64_t>(tokens.size())) {
    tokens.resize(static_cast<size_t>(*m));
  }
  if (tokens.size() < 2) throw InvalidArgument("--text " + text_path + " has fewer than 2 tokens");
  const bool tty = isatty(STDERR_FILENO) != 0;
  int last_percent = -1;
  opt.on_progress = [&](int64_t done, int64_t total) {
    const int percent = static_cast<int>(100 * done / total);
    if (percent / 10 == last_percent / 10 && percent != 100) return;
    last_percent = percent;
    std::fprintf(stderr,
                 tty ? "\r[pmkv eval] %3d%% (%lld / %lld tokens)"
                     : "[pmkv eval] %d%% (%lld / %lld tokens)\n",
                 percent, static_cast<long long>(done), static_cast<long long>(total));
    if (tty && percent == 100) std::fputc('\n', stderr);
  };
  nlohmann::json out;
  out["model"] = model_dir;
  out["text"] = text_path;
  out["tokens"] = tokens.size();
  out["window"] = std::min<int64_t>(opt.window, reference.config.max_position_embeddings > 0
                                                    ? reference.config.max_position_embeddings
                                                    : opt.window);
  out["chunk"] = opt.chunk;
  const auto kv_file = a.get("kv-config");
  // The reference: a plain 16-bit cache. With a KV config, remember its argmax per position.
  std::vector<int32_t> ref_argmax;
  if (kv_file) {
    opt.on_logits = [&](int64_t, std::span<const float> l) {
      ref_argmax.push_back(static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin()));
    };
  }
  const PerplexityResult ref = reference.perplexity(tokens, opt);
  out["reference_16bit"] = result_json(ref);
  out["reference_16bit"]["kv"] = kv_summary(kv::KvCacheConfig{}, reference);
  if (kv_file) {
    const kv::KvCacheConfig cfg = kv::load_kv_config(*kv_file);
    LocalModel model =
        LocalModel::open(model_dir, {.num_threads = threads, .device = device, .kv = cfg});
    int64_t agree = 0;
    opt.on_logits = [&](int64_t i, std::span<const float> l) {
      const auto am = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
      agree += (am == ref_argmax.at(static_cast<size_t>(i))) ? 1 : 0;
    };
    last_percent = -1;
    const PerplexityResult r = model.perplexity(tokens, opt);
    out["kv_config"] = *kv_file;
    out["result"] = result_json(r);
    out["result"]["kv"] = kv_summary(cfg, model);
    out["greedy_agreement"] = r.predicted > 0 ? static_cast<double>(agree) / r.predicted : 0.0;
    out["perplexity"] = r.perplexity();
    out["perplexity_ratio_vs_16bit"] = r.perplexity() / ref.perplexity();
  } else {
    out["perplexity"] = ref.perplexity();
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace pmkv::cli
