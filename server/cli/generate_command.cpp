// `pmkv generate`: one prompt through the CPU engine, streamed to stdout.
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <optional>
#include <string>
#include <thread>

#include "engine/common/error.h"
#include "engine/runtime/local_model.h"
#include "server/cli/args.h"
#include "server/cli/commands.h"

namespace pmkv::cli {

namespace {

constexpr const char* kHelp =
    R"(usage: pmkv generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [options]

  --model DIR               Hugging Face model directory (config.json, *.safetensors[, tokenizer.model])
  --prompt TEXT             prompt text (needs tokenizer.model); BOS added as tokenizer_config says
  --prompt-ids IDS          prompt as comma-separated token ids (works without a tokenizer)
  --max-tokens N            tokens to generate at most (default 256; capped by the model's context)
  --temperature T           0 = greedy (default 0)
  --top-k K, --top-p P, --min-p P
  --repetition-penalty R, --presence-penalty P, --frequency-penalty F
  --seed S                  same seed, same output
  --stop STR                stop string (repeatable); the text ends before it
  --stop-token-id ID        token id that ends generation besides EOS (repeatable)
  --ignore-eos              keep generating past EOS
  --threads N               CPU threads (default: all cores)
  --device auto|cpu|cuda    where the model runs (default auto: cuda when a GPU is present)
  --load-format F           safetensors (default) | dummy: random weights of config.json's shape
  --kv-config YAML          KV cache configuration (bits, sink/window, policy, budgets)
  --json                    print one JSON object instead of streaming text
)";

SamplingParams sampling_from(const Args& a) {
  SamplingParams p;
  p.max_tokens = static_cast<int32_t>(a.get_int("max-tokens").value_or(256));
  p.temperature = static_cast<float>(a.get_double("temperature").value_or(0.0));
  if (auto v = a.get_int("top-k")) p.top_k = static_cast<int32_t>(*v);
  if (auto v = a.get_double("top-p")) p.top_p = static_cast<float>(*v);
  if (auto v = a.get_double("min-p")) p.min_p = static_cast<float>(*v);
  if (auto v = a.get_double("repetition-penalty")) p.repetition_penalty = static_cast<float>(*v);
  if (auto v = a.get_double("presence-penalty")) p.presence_penalty = static_cast<float>(*v);
  if (auto v = a.get_double("frequency-penalty")) p.frequency_penalty = static_cast<float>(*v);
  if (auto v = a.get_int("seed")) p.seed = static_cast<uint64_t>(*v);
  p.stop = a.all("stop");
  for (const std::string& id : a.all("stop-token-id")) {
    const auto ids = parse_id_list(id, "--stop-token-id");
    p.stop_token_ids.insert(p.stop_token_ids.end(), ids.begin(), ids.end());
  }
  p.ignore_eos = a.flag("ignore-eos");
  p.validate();
  return p;
}

// The finished sequence's KV cache: per layer bytes, budget and tokens per bit-width.
nlohmann::json kv_json(const kv::SeqKvStats& st, const kv::KvCacheManager& kv) {
  nlohmann::json layers = nlohmann::json::array();
  for (const kv::LayerKvStats& l : st.layers) {
    nlohmann::json by_bits;
    for (size_t i = 0; i < kv::kStatBits.size(); ++i) {
      by_bits[std::to_string(kv::kStatBits[i])] = l.tokens_by_bits[i];
    }
    layers.push_back({{"bytes", l.bytes},
                      {"budget_bytes", l.budget_bytes < 0 ? nlohmann::json(nullptr)
                                                          : nlohmann::json(l.budget_bytes)},
                      {"pages", l.pages},
                      {"tokens_by_bits", by_bits}});
  }
  return {{"layers", layers},
          {"demotions", st.demotions},
          {"pool_pages_used_peak", kv.pool().peak_used()},
          {"page_bytes", kv.page_bytes()},
          {"policy", kv::to_string(kv.config().policy)}};
}

}  // namespace

int run_generate(const std::vector<std::string>& argv) {
  const Args a(argv, {.flags = {"json", "ignore-eos", "help"},
                      .values = {"model", "prompt", "prompt-ids", "max-tokens", "temperature",
                                 "top-k", "top-p", "min-p", "repetition-penalty",
                                 "presence-penalty", "frequency-penalty", "seed", "threads",
                                 "kv-config", "device", "load-format"},
                      .repeatable = {"stop", "stop-token-id"}});
  if (a.flag("help")) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  const bool json = a.flag("json");
  if (a.get("prompt").has_value() == a.get("prompt-ids").has_value()) {
    throw InvalidArgument("give exactly one of --prompt and --prompt-ids");
  }
  const SamplingParams params = sampling_from(a);
  LocalModelOptions options{.num_threads = static_cast<int32_t>(a.get_int("threads").value_or(0)),
                            .device = parse_device(a.get("device").value_or("auto"), "--device")};
  if (auto f = a.get("kv-config")) options.kv = kv::load_kv_config(*f);
  if (auto f = a.get("load-format")) {
    if (*f != "safetensors" && *f != "dummy") {
      throw InvalidArgument("--load-format: '" + *f + "' is not one of safetensors, dummy");
    }
    options.dummy_weights = *f == "dummy";
  }
  LocalModel model = LocalModel::open(a.require("model"), options);
  GenerationRequest req;
  req.params = params;
  if (auto text = a.get("prompt")) {
    if (!model.tokenizer) {
      throw InvalidArgument(
          "--prompt needs a tokenizer (tokenizer.model) in the model directory; "
          "use --prompt-ids for id-level use");
    }
    req.prompt_ids = model.tokenizer->encode_prompt(*text);
  } else {
    req.prompt_ids = parse_id_list(*a.get("prompt-ids"), "--prompt-ids");
  }
  if (!json && !model.tokenizer) {
    throw InvalidArgument("the model directory has no tokenizer: add --json to get token ids");
  }

  Generator::OnText stream;
  if (!json) {
    stream = [](size_t, std::string_view text) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    };
  }
  const GenerationRequest reqs[] = {req};
  auto results = model.generate(reqs, stream);
  const GenerationResult& r = results.front();
  const GenerationTimings& t = model.timings();
  if (json) {
    nlohmann::json out;
    out["prompt_ids"] = req.prompt_ids;
    out["output_ids"] = r.output_ids;
    out["text"] = r.text ? nlohmann::json(*r.text) : nlohmann::json(nullptr);
    out["finish_reason"] = to_string(r.finish_reason);
    out["device"] = device_name(model.device());
    out["prefill_tokens_per_s"] = t.prefill_tokens_per_s();
    out["decode_tokens_per_s"] = t.decode_tokens_per_s();
    out["kv"] = kv_json(r.kv, *model.kv());
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("\n");
    std::fprintf(stderr,
                 "[pmkv] prefill: %lld tokens, %.1f tokens/s | decode: %lld tokens, %.1f "
                 "tokens/s | finish: %s\n",
                 static_cast<long long>(t.prefill_tokens), t.prefill_tokens_per_s(),
                 static_cast<long long>(t.decode_tokens), t.decode_tokens_per_s(),
                 std::string(to_string(r.finish_reason)).c_str());
  }
  return 0;
}

}  // namespace pmkv::cli
