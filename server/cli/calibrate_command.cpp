// `pmkv calibrate`: offline KV calibration (sensitivity -> allocate -> max-keys -> rep-scales).
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

#include "engine/calibrate/allocate.h"
#include "engine/calibrate/calibration_data.h"
#include "engine/calibrate/key_scales.h"
#include "engine/calibrate/sensitivity.h"
#include "engine/common/error.h"
#include "server/cli/args.h"
#include "server/cli/commands.h"

namespace pmkv::cli {

namespace {

constexpr const char* kHelp = R"(usage: pmkv calibrate <step> [options]

steps (PM-KVQ's offline pipeline, on the CPU engine):
  sensitivity --model DIR --text FILE --out FILE.json
      per layer and bit-width KV sensitivity (mean KL of the next-token distribution with one
      layer's K or V fake-quantized), on calibration samples with stretched positions
  allocate --sensitivity FILE --memory-mb M --bits 4,2 --kv-width W --max-len L --out FILE.yaml
      one final bit-width per layer minimizing total sensitivity under M MiB per sequence
      (exact multiple-choice knapsack); writes the KV budgets file
  max-keys --model DIR --text FILE --out FILE.safetensors
      per-channel key maxima (RoPE pairs folded) with stretched positions
  rep-scales --model DIR --text FILE --max-keys FILE --out FILE.safetensors
      per-layer reparameterization exponent (grid search on attention-output MSE under K/V
      quantization); the KV config's key_scales (or --key-scales) folds the file into the weights

calibration sample options (sensitivity, max-keys, rep-scales):
  --samples N (8)  --seq-len L (512)  --effective-len E (4 x seq-len; a multiple of it)
  --seed S (0)  --threads T (all cores)
allocate options: --head-dim D (128; for the scale/zero overhead report)
rep-scales options: --grid G (20)  --k-bits B (4)  --v-bits B (4)
)";

std::string read_text(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument(std::string("cannot read ") + what + " " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<int> parse_bits(const std::string& s) {
  std::vector<int> out;
  for (int32_t b : parse_id_list(s, "--bits"))
    out.push_back(b);
  return out;
}

const Args::Spec kSampleSpec{
    .flags = {"help"},
    .values = {"model", "text", "out", "samples", "seq-len", "effective-len", "seed", "threads",
               "bits", "max-keys", "grid", "k-bits", "v-bits"},
    .repeatable = {}};

struct Loaded {
  LocalModel model;
  calibrate::CalibrationSet data;
};

Loaded load_samples(const Args& a) {
  LocalModel model = LocalModel::open(
      a.require("model"), {.num_threads = static_cast<int32_t>(a.get_int("threads").value_or(0))});
  if (!model.tokenizer) {
    throw InvalidArgument("calibration needs a tokenizer (tokenizer.model) in the model directory");
  }
  const auto text = read_text(a.require("text"), "--text");
  calibrate::CalibrationOptions o;
  o.num_samples = static_cast<int32_t>(a.get_int("samples").value_or(8));
  o.seq_len = static_cast<int32_t>(a.get_int("seq-len").value_or(512));
  o.effective_len = static_cast<int32_t>(a.get_int("effective-len").value_or(4 * o.seq_len));
  o.seed = static_cast<uint64_t>(a.get_int("seed").value_or(0));
  if (model.config.max_position_embeddings > 0 &&
      o.effective_len > model.config.max_position_embeddings) {
    std::fprintf(stderr,
                 "[pmkv calibrate] note: effective length %d exceeds the model's "
                 "max_position_embeddings %lld\n",
                 o.effective_len, static_cast<long long>(model.config.max_position_embeddings));
  }
  auto data = calibrate::make_calibration_set(model.tokenizer->encode(text, true), o);
  return {std::move(model), std::move(data)};
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path);
  if (!out || !(out << content)) throw InvalidArgument("cannot write --out " + path);
}

int run_sensitivity(const Args& a) {
  auto [model, data] = load_samples(a);
  calibrate::SensitivityOptions o;
  if (auto b = a.get("bits")) o.bits = parse_bits(*b);
  o.on_progress = calibrate::progress_printer("sensitivity");
  const auto s = calibrate::measure_sensitivity(model, data, o);
  nlohmann::json extra = {{"method", "kl_fake_quant"},
                          {"samples", data.samples.size()},
                          {"seq_len", data.samples.front().size()},
                          {"stretch", data.stretch},
                          {"offsets", data.offsets},
                          {"model", a.require("model")}};
  const std::string out = calibrate::sensitivity_to_json(s, extra.dump());
  write_file(a.require("out"), out + "\n");
  std::printf("%s\n", out.c_str());
  return 0;
}

int run_allocate(const std::vector<std::string>& argv) {
  const Args a(argv, {.flags = {"help"},
                      .values = {"sensitivity", "memory-mb", "bits", "kv-width", "max-len",
                                 "head-dim", "out"},
                      .repeatable = {}});
  const std::string sens_path = a.require("sensitivity");
  const auto s =
      calibrate::parse_sensitivity_json(read_text(sens_path, "--sensitivity"), sens_path);
  calibrate::AllocationProblem p;
  p.choices = parse_bits(a.require("bits"));
  const double mb = a.get_double("memory-mb").value_or(0);
  if (!(mb > 0)) throw InvalidArgument("--memory-mb must be a positive number");
  p.memory_bytes = static_cast<int64_t>(mb * 1024 * 1024);
  p.kv_width = a.get_int("kv-width").value_or(0);
  p.max_len = a.get_int("max-len").value_or(0);
  p.head_dim = a.get_int("head-dim").value_or(128);
  const auto alloc = calibrate::allocate(s, p);
  const std::string comment = "from " + sens_path + ", memory " + std::to_string(mb) +
                              " MiB per sequence, bits " + a.require("bits");
  write_file(a.require("out"), calibrate::budgets_yaml(alloc, p, comment));
  nlohmann::json j = {{"bits", alloc.bits},
                      {"layer_bytes", alloc.layer_bytes},
                      {"total_bytes", alloc.total_bytes},
                      {"memory_bytes", p.memory_bytes},
                      {"total_sensitivity", alloc.total_sensitivity},
                      {"scale_zero_overhead_bytes", alloc.params_bytes},
                      {"out", a.require("out")}};
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

int run_max_keys(const Args& a) {
  auto [model, data] = load_samples(a);
  const auto m =
      calibrate::measure_key_maxima(model, data, calibrate::progress_printer("max-keys"));
  calibrate::write_key_maxima(a.require("out"), m, model.config);
  nlohmann::json j = {{"layers", m.size()},
                      {"samples", data.samples.size()},
                      {"stretch", data.stretch},
                      {"out", a.require("out")}};
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

int run_rep_scales(const Args& a) {
  auto [model, data] = load_samples(a);
  const auto maxima = calibrate::read_key_maxima(a.require("max-keys"), model.config);
  calibrate::RepScaleOptions o;
  o.grid = static_cast<int32_t>(a.get_int("grid").value_or(20));
  o.k_bits = static_cast<int>(a.get_int("k-bits").value_or(4));
  o.v_bits = static_cast<int>(a.get_int("v-bits").value_or(4));
  if (o.grid < 1) throw InvalidArgument("--grid must be at least 1");
  for (int b : {o.k_bits, o.v_bits}) {
    if (b != 16 && b != 8 && b != 4 && b != 2)
      throw InvalidArgument("--k-bits/--v-bits: 16, 8, 4 or 2");
  }
  o.on_progress = calibrate::progress_printer("rep-scales");
  const auto r = calibrate::search_rep_scales(model, data, maxima, o);
  calibrate::write_key_scales(a.require("out"), r, model.config);
  nlohmann::json j = {{"alpha", r.alpha},
                      {"mse_plain", r.mse_plain},
                      {"mse_scaled", r.mse_scaled},
                      {"out", a.require("out")}};
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

}  // namespace

int run_calibrate(const std::vector<std::string>& argv) {
  if (argv.empty() || argv[0] == "--help" || argv[0] == "help") {
    std::fputs(kHelp, argv.empty() ? stderr : stdout);
    return argv.empty() ? 2 : 0;
  }
  const std::string step = argv[0];
  const std::vector<std::string> rest(argv.begin() + 1, argv.end());
  if (step == "allocate") return run_allocate(rest);
  const Args a(rest, kSampleSpec);
  if (step == "sensitivity") return run_sensitivity(a);
  if (step == "max-keys") return run_max_keys(a);
  if (step == "rep-scales") return run_rep_scales(a);
  throw InvalidArgument("unknown calibrate step '" + step +
                        "' (sensitivity, allocate, max-keys, rep-scales)");
}

}  // namespace pmkv::cli
