// `pmkv eval`: perplexity of a model (through its KV cache) on a text file.
#include <unistd.h>
#include <nlohmann/json.hpp>

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

  --model DIR       Hugging Face model directory with tokenizer.model
  --text FILE       UTF-8 text file
  --window N        tokens per window (default 2048; capped by the model's context)
  --chunk N         prefill chunk size (default 512)
  --threads N       CPU threads (default: all cores)
)";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument("cannot read --text file " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

int run_eval(const std::vector<std::string>& argv) {
  const Args a(argv, {.flags = {"help"},
                      .values = {"model", "text", "window", "chunk", "threads"},
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
  LocalModel model = LocalModel::open(
      a.require("model"), {.num_threads = static_cast<int32_t>(a.get_int("threads").value_or(0))});
  if (!model.tokenizer) {
    throw InvalidArgument("eval needs a tokenizer (tokenizer.model) in the model directory");
  }
  const std::string text = read_file(text_path);
  const std::vector<int32_t> tokens = model.tokenizer->encode(text, /*add_bos=*/true);
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
  const PerplexityResult r = model.perplexity(tokens, opt);
  nlohmann::json out;
  out["model"] = a.require("model");
  out["text"] = text_path;
  out["tokens"] = tokens.size();
  out["window"] = std::min<int64_t>(opt.window, model.config.max_position_embeddings > 0
                                                    ? model.config.max_position_embeddings
                                                    : opt.window);
  out["windows"] = r.windows;
  out["predicted"] = r.predicted;
  out["nll"] = r.nll;
  out["perplexity"] = r.perplexity();
  out["kv_cache"] = "16-bit";
  out["seconds"] = r.seconds;
  out["tokens_per_s"] = r.seconds > 0 ? static_cast<double>(tokens.size()) / r.seconds : 0.0;
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace pmkv::cli
