#include "engine/kv/kv_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "engine/common/error.h"

namespace pmkv::kv {

namespace {

[[noreturn]] void fail(const std::string& source, const std::string& key, const std::string& what) {
  throw InvalidArgument(source + ": kv_cache." + key + ": " + what);
}

template <class T>
T scalar(const YAML::Node& n, const std::string& source, const std::string& key,
         const char* type_name) {
  if (!n.IsScalar()) fail(source, key, std::string("expected ") + type_name);
  try {
    return n.as<T>();
  } catch (const YAML::Exception&) {
    fail(source, key, std::string("expected ") + type_name + ", got '" + n.Scalar() + "'");
  }
}

int64_t parse_bytes(const YAML::Node& n, const std::string& source, const std::string& key) {
  // An integer, or an integer with a K/M/G suffix (powers of 1024: "64K", "2M").
  if (!n.IsScalar()) fail(source, key, "expected a byte count");
  std::string s = n.Scalar();
  int64_t mult = 1;
  if (!s.empty()) {
    const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(s.back())));
    if (u == 'K' || u == 'M' || u == 'G') {
      mult = u == 'K' ? 1024 : u == 'M' ? 1024 * 1024 : int64_t{1024} * 1024 * 1024;
      s.pop_back();
    }
  }
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != s.size() || v < 0) {
    fail(source, key,
         "expected a byte count (an integer, optionally with K, M or G), got '" + n.Scalar() + "'");
  }
  return v * mult;
}

}  // namespace

std::string to_string(DemotionPolicy p) {
  return p == DemotionPolicy::kBlock ? "block" : "oldest_first";
}

void KvCacheConfig::validate() const {
  auto bad = [](const std::string& key, const std::string& what) {
    throw InvalidArgument("kv_cache." + key + ": " + what);
  };
  if (page_bytes < 0) bad("page_bytes", "must be >= 0 (0 = automatic)");
  if (bit_ladder.empty() || bit_ladder.front() != 16) bad("bit_ladder", "must start at 16");
  for (size_t i = 0; i < bit_ladder.size(); ++i) {
    const int b = bit_ladder[i];
    if (!is_valid_bits(b)) bad("bit_ladder", "bits must be 16, 8, 4 or 2");
    if (i > 0 && b != bit_ladder[i - 1] / 2) {
      bad("bit_ladder", "each step must halve the bits (e.g. [16, 8, 4, 2])");
    }
  }
  auto on_ladder = [&](int b) {
    return std::find(bit_ladder.begin(), bit_ladder.end(), b) != bit_ladder.end();
  };
  if (!on_ladder(init_bits)) bad("init_bits", "must be on the bit ladder");
  if (!on_ladder(floor_bits)) bad("floor_bits", "must be on the bit ladder");
  if (floor_bits > init_bits) bad("floor_bits", "must not exceed init_bits");
  if (sink_tokens < 0) bad("sink_tokens", "must be >= 0");
  if (window_tokens <= 0) bad("window_tokens", "must be > 0");
  const int budgets = int(per_layer_bytes.has_value()) + int(uniform_bits.has_value()) +
                      int(budget_file.has_value());
  if (budgets > 1) {
    bad("budget", "give only one of per_layer_bytes, uniform_bits (+ max_len) and file");
  }
  if (per_layer_bytes && *per_layer_bytes <= 0) bad("budget.per_layer_bytes", "must be > 0");
  if (uniform_bits) {
    if (!is_valid_bits(*uniform_bits)) bad("budget.uniform_bits", "must be 16, 8, 4 or 2");
    if (!uniform_max_len || *uniform_max_len <= 0) {
      bad("budget.max_len", "uniform_bits needs max_len > 0 (tokens the budget is sized for)");
    }
  } else if (uniform_max_len) {
    bad("budget.max_len", "only meaningful with uniform_bits");
  }
}

KvCacheConfig parse_kv_config_yaml(const std::string& yaml_text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw InvalidArgument(source + ": not valid YAML: " + e.what());
  }
  YAML::Node n = root;
  if (root.IsMap() && root["kv_cache"]) n = root["kv_cache"];
  KvCacheConfig c;
  if (!n || n.IsNull()) return c;
  if (!n.IsMap()) throw InvalidArgument(source + ": kv_cache must be a mapping");
  static const std::set<std::string> kKeys = {
      "page_bytes",    "init_bits", "bit_ladder", "floor_bits",   "sink_tokens",
      "window_tokens", "policy",    "budget",     "floor_action", "key_scales",
      "hold_prompt"};
  for (const auto& kv : n) {
    const std::string key = kv.first.as<std::string>();
    if (!kKeys.contains(key)) fail(source, key, "unknown key");
    const YAML::Node& v = kv.second;
    if (key == "page_bytes") {
      c.page_bytes = (v.IsScalar() && v.Scalar() == "auto") ? 0 : parse_bytes(v, source, key);
    } else if (key == "init_bits") {
      c.init_bits = scalar<int32_t>(v, source, key, "an integer");
    } else if (key == "floor_bits") {
      c.floor_bits = scalar<int32_t>(v, source, key, "an integer");
    } else if (key == "sink_tokens") {
      c.sink_tokens = scalar<int32_t>(v, source, key, "an integer");
    } else if (key == "window_tokens") {
      c.window_tokens = scalar<int32_t>(v, source, key, "an integer");
    } else if (key == "hold_prompt") {
      c.hold_prompt = scalar<bool>(v, source, key, "true or false");
    } else if (key == "bit_ladder") {
      if (!v.IsSequence()) fail(source, key, "expected a list of bit-widths");
      c.bit_ladder.clear();
      for (const auto& b : v)
        c.bit_ladder.push_back(scalar<int32_t>(b, source, key, "an integer"));
    } else if (key == "policy") {
      const auto p = scalar<std::string>(v, source, key, "a string");
      if (p == "block") {
        c.policy = DemotionPolicy::kBlock;
      } else if (p == "oldest_first") {
        c.policy = DemotionPolicy::kOldestFirst;
      } else {
        fail(source, key, "must be block or oldest_first, got '" + p + "'");
      }
    } else if (key == "key_scales") {
      std::filesystem::path f = scalar<std::string>(v, source, key, "a path");
      if (f.is_relative() && std::filesystem::exists(source)) {
        f = std::filesystem::path(source).parent_path() / f;
      }
      c.key_scales = f;
    } else if (key == "floor_action") {
      const auto a = scalar<std::string>(v, source, key, "a string");
      if (a != "finish") fail(source, key, "must be finish, got '" + a + "'");
      c.floor_action = FloorAction::kFinish;
    } else if (key == "budget") {
      if (v.IsNull()) continue;
      if (!v.IsMap()) fail(source, key, "expected a mapping");
      for (const auto& bkv : v) {
        const std::string bkey = bkv.first.as<std::string>();
        const std::string full = "budget." + bkey;
        if (bkey == "per_layer_bytes") {
          c.per_layer_bytes = parse_bytes(bkv.second, source, full);
        } else if (bkey == "uniform_bits") {
          c.uniform_bits = scalar<int32_t>(bkv.second, source, full, "an integer");
        } else if (bkey == "max_len") {
          c.uniform_max_len = scalar<int64_t>(bkv.second, source, full, "an integer");
        } else if (bkey == "file") {
          std::filesystem::path f = scalar<std::string>(bkv.second, source, full, "a path");
          // Relative paths are relative to the config file.
          if (f.is_relative() && std::filesystem::exists(source)) {
            f = std::filesystem::path(source).parent_path() / f;
          }
          c.budget_file = f;
        } else {
          fail(source, full, "unknown key");
        }
      }
    }
  }
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(source + ": " + e.what());
  }
  return c;
}

KvCacheConfig load_kv_config(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw InvalidArgument("cannot read KV config file " + file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_kv_config_yaml(ss.str(), file.string());
}

PageGeometry resolve_geometry(const KvCacheConfig& c, int32_t num_kv_heads, int32_t head_dim) {
  // auto: kDefaultTokens16, or 16 (the earlier default) where window_tokens is not a multiple of
  // it: the window is flushed in whole 16-bit pages, and configurations written for 16-token pages
  // keep working. A window that fits neither is an error naming the key (KvCacheManager).
  PageGeometry g{num_kv_heads, head_dim,
                 c.window_tokens % kDefaultTokens16 == 0 ? kDefaultTokens16 : 16};
  if (c.page_bytes == 0) return g;
  g.tokens16 = 0;
  for (int32_t t = 1;; ++t) {
    const PageGeometry next{num_kv_heads, head_dim, t};
    if (page_bytes(next) > c.page_bytes) break;
    g = next;
  }
  if (g.tokens16 == 0) {
    throw InvalidArgument("kv_cache.page_bytes: " + std::to_string(c.page_bytes) +
                          " bytes cannot hold one token of this model (" +
                          std::to_string(page_bytes(PageGeometry{num_kv_heads, head_dim, 1})) +
                          " bytes needed)");
  }
  return g;
}

int64_t pages_for_uniform(const KvCacheConfig& c, const PageGeometry& g, int64_t tokens, int bits) {
  const int64_t t16 = g.tokens16;
  const int64_t sink = std::min<int64_t>(tokens, c.sink_tokens);
  const int64_t rest = tokens - sink;
  const int64_t window = rest % c.window_tokens;
  const int64_t body = rest - window;
  const int64_t cap = tokens_per_page(g, bits);
  return (sink + t16 - 1) / t16 + (window + t16 - 1) / t16 + (body + cap - 1) / cap;
}

std::vector<int64_t> resolve_layer_budgets(const KvCacheConfig& c, int32_t num_layers,
                                           const PageGeometry& g) {
  const int64_t pb = page_bytes(g);
  if (c.per_layer_bytes) return std::vector<int64_t>(num_layers, *c.per_layer_bytes);
  if (c.uniform_bits) {
    return std::vector<int64_t>(num_layers,
                                pages_for_uniform(c, g, *c.uniform_max_len, *c.uniform_bits) * pb);
  }
  if (!c.budget_file) return {};
  const std::string f = c.budget_file->string();
  YAML::Node root;
  try {
    root = YAML::LoadFile(f);
  } catch (const YAML::Exception& e) {
    throw InvalidArgument("KV budgets file " + f + ": " + e.what());
  }
  const YAML::Node layers = root["layers"];
  if (!layers || !layers.IsSequence()) {
    throw InvalidArgument("KV budgets file " + f + ": needs a `layers` list");
  }
  // With a top-level max_len (files from `pmkv calibrate allocate`), a layer's budget is the pages
  // a cache whose body ends at the entry's `bits` holds at max_len tokens; without it,
  // budget_bytes is the page budget itself.
  std::optional<int64_t> max_len;
  if (root["max_len"]) {
    try {
      max_len = root["max_len"].as<int64_t>();
    } catch (const YAML::Exception&) {
      throw InvalidArgument("KV budgets file " + f + ": max_len must be an integer");
    }
    if (*max_len <= 0) throw InvalidArgument("KV budgets file " + f + ": max_len must be > 0");
  }
  std::vector<int64_t> out(num_layers, -1);
  for (size_t i = 0; i < layers.size(); ++i) {
    const YAML::Node e = layers[i];
    const std::string where = "KV budgets file " + f + ", entry " + std::to_string(i);
    if (!e.IsMap() || !e["layer"] || !e["budget_bytes"]) {
      throw InvalidArgument(where + ": needs `layer` and `budget_bytes`");
    }
    int64_t layer = 0, bytes = 0;
    try {
      layer = e["layer"].as<int64_t>();
      bytes = e["budget_bytes"].as<int64_t>();
    } catch (const YAML::Exception&) {
      throw InvalidArgument(where + ": `layer` and `budget_bytes` must be integers");
    }
    if (layer < 0 || layer >= num_layers) {
      throw InvalidArgument(where + ": layer " + std::to_string(layer) + " outside [0, " +
                            std::to_string(num_layers) + ")");
    }
    if (out[layer] >= 0) {
      throw InvalidArgument(where + ": layer " + std::to_string(layer) + " given twice");
    }
    if (max_len) {
      int bits = 0;
      try {
        bits = e["bits"] ? e["bits"].as<int>() : 0;
      } catch (const YAML::Exception&) {
        bits = 0;
      }
      if (!is_valid_bits(bits)) {
        throw InvalidArgument(where + ": `bits` must be 16, 8, 4 or 2 when the file has max_len");
      }
      bytes = pages_for_uniform(c, g, *max_len, bits) * pb;
    }
    if (bytes < pb) {
      throw InvalidArgument(where + ": budget_bytes " + std::to_string(bytes) +
                            " is smaller than one page (" + std::to_string(pb) + " bytes)");
    }
    out[layer] = bytes;
  }
  for (int32_t l = 0; l < num_layers; ++l) {
    if (out[l] < 0) {
      throw InvalidArgument("KV budgets file " + f + ": no entry for layer " + std::to_string(l));
    }
  }
  return out;
}

}  // namespace pmkv::kv
