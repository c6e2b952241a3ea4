#include "engine/model/model_config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>
#include <sstream>

#include "engine/common/error.h"

namespace pmkv {

namespace {

using json = nlohmann::json;

// Sizes are bounded so that products such as num_heads * head_dim cannot overflow int64.
constexpr int64_t kMaxSize = std::numeric_limits<int32_t>::max();

// Typed access to one JSON object of the config, with messages naming the file and the key
// (prefixed for nested objects, e.g. "rope_scaling.factor").
class Reader {
 public:
  Reader(const json& obj, const std::string& source, std::string prefix = "")
      : obj_(obj), source_(source), prefix_(std::move(prefix)) {}

  std::string where(const std::string& key) const {
    return "key " + prefix_ + key + " in " + source_;
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw LoadError(where(key) + " " + what);
  }

  // Present and not null.
  bool has(const std::string& key) const {
    auto it = obj_.find(key);
    return it != obj_.end() && !it->is_null();
  }
  const json& at(const std::string& key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) throw LoadError("missing " + where(key));
    return *it;
  }

  int64_t integer(const std::string& key) const {
    const json& v = at(key);
    if (v.is_number_unsigned()) {
      if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail(key, "is out of range: " + v.dump());
      }
      return static_cast<int64_t>(v.get<uint64_t>());
    }
    if (!v.is_number_integer()) fail(key, "must be an integer, got " + v.dump());
    return v.get<int64_t>();
  }
  int64_t positive(const std::string& key) const {
    int64_t v = integer(key);
    if (v <= 0 || v > kMaxSize) {
      fail(key, "must be a positive integer <= " + std::to_string(kMaxSize) + ", got " +
                    std::to_string(v));
    }
    return v;
  }
  int64_t positive_or(const std::string& key, int64_t dflt) const {
    return has(key) ? positive(key) : dflt;
  }
  double number(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_number()) fail(key, "must be a number, got " + v.dump());
    double d = v.get<double>();
    if (!std::isfinite(d)) fail(key, "must be finite, got " + v.dump());
    return d;
  }
  double positive_number(const std::string& key) const {
    double d = number(key);
    if (!(d > 0)) fail(key, "must be > 0, got " + at(key).dump());
    return d;
  }
  double positive_number_or(const std::string& key, double dflt) const {
    return has(key) ? positive_number(key) : dflt;
  }
  bool boolean_or(const std::string& key, bool dflt) const {
    if (!has(key)) return dflt;
    const json& v = at(key);
    if (!v.is_boolean()) fail(key, "must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string string(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_string()) fail(key, "must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  const json& object(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_object()) fail(key, "must be an object, got " + v.dump());
    return v;
  }
  int32_t token_id(const std::string& key, const json& v) const {
    bool ok = false;
    int64_t id = 0;
    if (v.is_number_unsigned()) {
      ok = v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int32_t>::max());
      id = ok ? static_cast<int64_t>(v.get<uint64_t>()) : 0;
    } else if (v.is_number_integer()) {
      id = v.get<int64_t>();
      ok = id >= 0 && id <= std::numeric_limits<int32_t>::max();
    }
    if (!ok)
      fail(key, "must be a non-negative 32-bit token id (or a list of them), got " + v.dump());
    return static_cast<int32_t>(id);
  }

  const std::string& source() const { return source_; }

 private:
  const json& obj_;
  const std::string& source_;
  std::string prefix_;
};

RopeType parse_rope_type(const std::string& value, const Reader& r, const std::string& key) {
  if (value == "default") return RopeType::kDefault;
  if (value == "linear") return RopeType::kLinear;
  if (value == "llama3") return RopeType::kLlama3;
  throw LoadError("unsupported RoPE type: " + r.where(key) + " is '" + value +
                  "' (supported: default, linear, llama3)");
}

void check_partial_rotary(const Reader& r) {
  if (!r.has("partial_rotary_factor")) return;
  double p = r.number("partial_rotary_factor");
  if (p != 1.0) {
    r.fail("partial_rotary_factor", "is " + r.at("partial_rotary_factor").dump() +
                                        "; only 1.0 (RoPE over the whole head) is supported");
  }
}

// RoPE from either `rope_parameters` (transformers >= 4.56 / 5.x; wins when both are present)
// or the classic `rope_theta` + `rope_scaling`.
RopeConfig parse_rope(const Reader& top) {
  RopeConfig rope;
  check_partial_rotary(top);
  rope.theta = top.positive_number_or("rope_theta", 10000.0);

  const char* params_key = nullptr;
  if (top.has("rope_parameters")) {
    params_key = "rope_parameters";
  } else if (top.has("rope_scaling")) {
    params_key = "rope_scaling";
  }
  if (params_key == nullptr) return rope;  // absent or null: default RoPE

  const json& params = top.object(params_key);
  Reader p(params, top.source(), std::string(params_key) + ".");
  const bool modern = std::string(params_key) == "rope_parameters";
  if (modern) {
    check_partial_rotary(p);
    rope.theta = p.positive_number_or("rope_theta", rope.theta);
  }

  std::string type_key = p.has("rope_type") ? "rope_type" : "type";
  std::string type;
  if (p.has(type_key)) {
    type = p.string(type_key);
  } else if (modern) {
    type = "default";
  } else {
    throw LoadError("missing " + p.where("rope_type") + " (or \"type\")");
  }
  rope.type = parse_rope_type(type, p, type_key);

  switch (rope.type) {
    case RopeType::kDefault:
      break;
    case RopeType::kLinear:
      rope.factor = p.positive_number("factor");
      break;
    case RopeType::kLlama3:
      rope.factor = p.positive_number("factor");
      rope.low_freq_factor = p.positive_number("low_freq_factor");
      rope.high_freq_factor = p.positive_number("high_freq_factor");
      rope.original_max_position_embeddings = p.positive("original_max_position_embeddings");
      if (!(rope.high_freq_factor > rope.low_freq_factor)) {
        p.fail("high_freq_factor", "must be greater than low_freq_factor (" +
                                       p.at("high_freq_factor").dump() +
                                       " <= " + p.at("low_freq_factor").dump() + ")");
      }
      break;
  }
  return rope;
}

// Decides the one sliding window of the model (or none). ModelConfig has a single window for all
// layers, so a model whose layers mix sliding and full attention is rejected.
std::optional<int64_t> parse_sliding_window(const ModelConfig& cfg, const Reader& r) {
  if (cfg.model_type == "llama") return std::nullopt;

  std::optional<int64_t> window;
  if (cfg.model_type == "mistral") {
    if (r.has("sliding_window")) window = r.positive("sliding_window");
  } else {  // qwen2: the window only exists with use_sliding_window
    if (r.boolean_or("use_sliding_window", false) && r.has("sliding_window")) {
      window = r.positive("sliding_window");
    }
  }
  if (!window) return std::nullopt;

  // Which layers use the window: `layer_types` when given, else mistral all of them and qwen2
  // those at index >= max_window_layers (transformers' Qwen2Config).
  std::vector<bool> sliding(static_cast<size_t>(cfg.num_layers), true);
  if (r.has("layer_types")) {
    const json& lt = r.at("layer_types");
    if (!lt.is_array() || static_cast<int64_t>(lt.size()) != cfg.num_layers) {
      r.fail("layer_types", "must be a list of num_hidden_layers (" +
                                std::to_string(cfg.num_layers) + ") strings");
    }
    for (size_t i = 0; i < lt.size(); ++i) {
      if (lt[i] == "sliding_attention") {
        sliding[i] = true;
      } else if (lt[i] == "full_attention") {
        sliding[i] = false;
      } else {
        r.fail("layer_types", "has unsupported entry " + lt[i].dump() +
                                  " (supported: full_attention, sliding_attention)");
      }
    }
  } else if (cfg.model_type == "qwen2") {
    int64_t max_window_layers = r.has("max_window_layers") ? r.integer("max_window_layers") : 28;
    if (max_window_layers < 0) r.fail("max_window_layers", "must be >= 0");
    for (int64_t i = 0; i < cfg.num_layers; ++i)
      sliding[i] = i >= max_window_layers;
  }
  bool any = false, all = true;
  for (bool s : sliding) {
    any = any || s;
    all = all && s;
  }
  if (!any) return std::nullopt;
  if (!all) {
    throw LoadError("unsupported attention layout in " + r.source() +
                    ": some layers use the sliding window and others full attention (see "
                    "layer_types / max_window_layers)");
  }
  return window;
}

}  // namespace

ModelConfig parse_model_config_text(const std::string& json_text, const std::string& source_name) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    throw LoadError("malformed JSON in " + source_name + ": " + e.what());
  }
  if (!root.is_object()) throw LoadError(source_name + " is not a JSON object");
  Reader r(root, source_name);

  ModelConfig cfg;
  cfg.model_type = r.string("model_type");
  if (cfg.model_type != "llama" && cfg.model_type != "mistral" && cfg.model_type != "qwen2") {
    throw LoadError("unsupported model_type '" + cfg.model_type + "' in " + source_name +
                    " (supported: llama, mistral, qwen2)");
  }
  if (r.has("hidden_act") && r.string("hidden_act") != "silu") {
    r.fail("hidden_act", "is '" + r.string("hidden_act") + "'; only silu is supported");
  }

  cfg.vocab_size = r.positive("vocab_size");
  cfg.hidden_size = r.positive("hidden_size");
  cfg.intermediate_size = r.positive("intermediate_size");
  cfg.num_layers = r.positive("num_hidden_layers");
  cfg.num_heads = r.positive("num_attention_heads");
  cfg.num_kv_heads = r.positive_or("num_key_value_heads", cfg.num_heads);
  if (cfg.num_heads % cfg.num_kv_heads != 0) {
    r.fail("num_key_value_heads", "(" + std::to_string(cfg.num_kv_heads) +
                                      ") must divide num_attention_heads (" +
                                      std::to_string(cfg.num_heads) + ")");
  }
  if (r.has("head_dim")) {
    cfg.head_dim = r.positive("head_dim");
  } else {
    if (cfg.hidden_size % cfg.num_heads != 0) {
      r.fail("hidden_size", "(" + std::to_string(cfg.hidden_size) +
                                ") is not divisible by num_attention_heads (" +
                                std::to_string(cfg.num_heads) + ") and head_dim is not given");
    }
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
  }
  if (cfg.head_dim % 2 != 0) {
    r.fail("head_dim", "(" + std::to_string(cfg.head_dim) + ") must be even for RoPE");
  }
  cfg.max_position_embeddings = r.positive("max_position_embeddings");
  cfg.rms_norm_eps = r.positive_number_or("rms_norm_eps", 1e-6);
  cfg.rope = parse_rope(r);
  cfg.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);

  if (cfg.model_type == "llama") {
    bool attention_bias = r.boolean_or("attention_bias", false);
    cfg.qkv_bias = attention_bias;
    cfg.o_bias = attention_bias;
    cfg.mlp_bias = r.boolean_or("mlp_bias", false);
  } else if (cfg.model_type == "qwen2") {
    cfg.qkv_bias = true;
    cfg.o_bias = false;
    cfg.mlp_bias = false;
  }
  cfg.sliding_window = parse_sliding_window(cfg, r);

  if (r.has("torch_dtype")) {
    cfg.torch_dtype = r.string("torch_dtype");
  } else if (r.has("dtype")) {
    cfg.torch_dtype = r.string("dtype");
  }
  if (r.has("bos_token_id")) cfg.bos_token_id = r.token_id("bos_token_id", r.at("bos_token_id"));
  if (r.has("eos_token_id")) {
    const json& eos = r.at("eos_token_id");
    if (eos.is_array()) {
      for (const json& id : eos)
        cfg.eos_token_ids.push_back(r.token_id("eos_token_id", id));
    } else {
      cfg.eos_token_ids.push_back(r.token_id("eos_token_id", eos));
    }
  }
  return cfg;
}

ModelConfig parse_model_config(const std::filesystem::path& config_json) {
  std::ifstream in(config_json, std::ios::binary);
  if (!in) throw LoadError("cannot read model config " + config_json.string());
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw LoadError("cannot read model config " + config_json.string());
  return parse_model_config_text(ss.str(), config_json.string());
}

std::vector<float> rope_inv_freq(const ModelConfig& cfg) {
  const RopeConfig& rope = cfg.rope;
  const int64_t dim = cfg.head_dim;  // partial_rotary_factor is always 1
  std::vector<float> out;
  out.reserve(static_cast<size_t>(dim / 2));
  const double low_freq_wavelen =
      static_cast<double>(rope.original_max_position_embeddings) / rope.low_freq_factor;
  const double high_freq_wavelen =
      static_cast<double>(rope.original_max_position_embeddings) / rope.high_freq_factor;
  for (int64_t i = 0; i < dim; i += 2) {
    // _compute_default_rope_parameters
    double inv_freq = 1.0 / std::pow(rope.theta, static_cast<double>(i) / static_cast<double>(dim));
    switch (rope.type) {
      case RopeType::kDefault:
        break;
      case RopeType::kLinear:  // _compute_linear_scaling_rope_parameters
        inv_freq /= rope.factor;
        break;
      case RopeType::kLlama3: {  // _compute_llama3_parameters
        const double wavelen = 2.0 * std::numbers::pi / inv_freq;
        if (wavelen > low_freq_wavelen) {
          inv_freq /= rope.factor;
        } else if (!(wavelen < high_freq_wavelen)) {
          const double smooth =
              (static_cast<double>(rope.original_max_position_embeddings) / wavelen -
               rope.low_freq_factor) /
              (rope.high_freq_factor - rope.low_freq_factor);
          inv_freq = (1.0 - smooth) * inv_freq / rope.factor + smooth * inv_freq;
        }
        break;
      }
    }
    out.push_back(static_cast<float>(inv_freq));
  }
  return out;
}

}  // namespace pmkv
