#include "server/config.h"

#include <yaml-cpp/yaml.h>

#include <charconv>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "engine/common/error.h"

namespace pmkv {

std::string_view default_config_yaml() {
  static constexpr char kText[] =
#include "default_config.inc"
      ;
  return kText;
}

namespace {

[[noreturn]] void fail(const std::string& key, const std::string& what) {
  throw InvalidArgument("config error: " + key + ": " + what);
}

std::string shown(const YAML::Node& n) {
  if (n.IsScalar()) return "'" + n.Scalar() + "'";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "nothing";
}

YAML::Node load(const std::string& text, const std::string& source) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw InvalidArgument("config error: " + source + ": not valid YAML: " + e.what());
  }
}

// `over` onto `base`: mappings merge key by key, anything else replaces.
void merge(YAML::Node base, const YAML::Node& over) {
  for (const auto& kv : over) {
    const std::string key = kv.first.as<std::string>();
    if (base[key] && base[key].IsMap() && kv.second.IsNull()) continue;  // `section:` alone
    if (kv.second.IsMap() && base[key] && base[key].IsMap()) {
      merge(base[key], kv.second);
    } else {
      base[key] = YAML::Clone(kv.second);
    }
  }
}

void set_path(YAML::Node node, const std::vector<std::string>& path, size_t i,
              const YAML::Node& value) {
  if (i + 1 == path.size()) {
    node[path[i]] = value;
    return;
  }
  if (!node[path[i]].IsMap()) node[path[i]] = YAML::Node(YAML::NodeType::Map);
  set_path(node[path[i]], path, i + 1, value);
}

// "a.b=c": sets a.b to the YAML value c.
void apply_override(YAML::Node& root, const std::string& o) {
  const size_t eq = o.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw InvalidArgument("config error: --set '" + o + "': expected section.key=value");
  }
  const std::string key = o.substr(0, eq);
  std::vector<std::string> path;
  for (size_t b = 0;;) {
    const size_t dot = key.find('.', b);
    path.push_back(key.substr(b, dot == std::string::npos ? std::string::npos : dot - b));
    if (path.back().empty()) fail(key, "--set needs a key like section.key");
    if (dot == std::string::npos) break;
    b = dot + 1;
  }
  const YAML::Node value = load(o.substr(eq + 1), "--set " + key);
  if (!root.IsMap()) root = YAML::Node(YAML::NodeType::Map);
  set_path(root, path, 0, value);
}

// Relative kv_cache.budget.file and kv_cache.key_scales paths of a --config file are relative to
// its directory.
void resolve_paths(YAML::Node root, const std::filesystem::path& dir) {
  if (!root.IsMap() || !root["kv_cache"].IsMap()) return;
  auto resolve = [&](YAML::Node parent, const char* key) {
    if (!parent.IsMap() || !parent[key].IsScalar()) return;
    const std::filesystem::path f = parent[key].Scalar();
    if (f.is_relative()) parent[key] = (dir / f).string();
  };
  resolve(root["kv_cache"], "key_scales");
  resolve(root["kv_cache"]["budget"], "file");
}

// One section of the merged document: typed reads that name the full key on error, and a check
// that nothing unknown is left.
class Section {
 public:
  Section(const YAML::Node& root, std::string name) : name_(std::move(name)) {
    node_ = root[name_];
    if (node_ && !node_.IsNull() && !node_.IsMap()) fail(name_, "expected a mapping");
  }

  YAML::Node get(const std::string& key) {
    seen_.insert(key);
    const YAML::Node& n = node_;  // const: a missing key is not inserted
    const YAML::Node v = n ? n[key] : YAML::Node();
    if (!v) fail(full(key), "missing");
    return v;
  }
  std::string full(const std::string& key) const { return name_ + "." + key; }
  // Every key of the section was read.
  void done() const {
    if (!node_ || node_.IsNull()) return;
    for (const auto& kv : node_) {
      const std::string key = kv.first.as<std::string>();
      if (!seen_.contains(key)) fail(full(key), "unknown key");
    }
  }

  int64_t integer(const std::string& key, int64_t min, int64_t max, const std::string& what) {
    const YAML::Node v = get(key);
    int64_t x = 0;
    const std::string s = v.IsScalar() ? v.Scalar() : "";
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
    if (!v.IsScalar() || s.empty() || ec != std::errc() || end != s.data() + s.size() || x < min ||
        x > max) {
      fail(full(key), "expected " + what + " in [" + std::to_string(min) + ", " +
                          std::to_string(max) + "], got " + shown(v));
    }
    return x;
  }
  static constexpr double kMaxSeconds = 1e7;
  double number(const std::string& key) {
    const YAML::Node v = get(key);
    double x = -1;
    if (v.IsScalar()) {
      try {
        x = v.as<double>();
      } catch (const YAML::Exception&) {
        x = -1;
      }
    }
    // The cap keeps now() + the duration inside steady_clock's int64 nanoseconds: 9223372036 s
    // wrapped every request's deadline into the past (each was cancelled at once), and 1e300 s
    // overflowed the conversion to milliseconds.
    if (!v.IsScalar() || !std::isfinite(x) || x < 0 || x > kMaxSeconds) {
      fail(full(key),
           "expected a number of seconds in [0, 10000000] (10^7 s, about 115 days), got " +
               shown(v));
    }
    return x;
  }
  std::string string(const std::string& key, bool allow_null = false) {
    const YAML::Node v = get(key);
    if (allow_null && v.IsNull()) return {};
    if (!v.IsScalar()) fail(full(key), "expected a string, got " + shown(v));
    return v.Scalar();
  }
  bool boolean(const std::string& key) {
    const YAML::Node v = get(key);
    const std::string s = v.IsScalar() ? v.Scalar() : "";
    if (s == "true") return true;
    if (s == "false") return false;
    fail(full(key), "expected true or false, got " + shown(v));
  }
  std::string choice(const std::string& key, const std::set<std::string>& options) {
    const YAML::Node v = get(key);
    if (v.IsScalar() && options.contains(v.Scalar())) return v.Scalar();
    std::string list;
    for (const std::string& o : options)
      list += (list.empty() ? "" : ", ") + o;
    fail(full(key), "expected one of " + list + ", got " + shown(v));
  }
  int64_t bytes(const std::string& key) {
    const YAML::Node v = get(key);
    std::string s = v.IsScalar() ? v.Scalar() : "";
    int64_t mult = 1;
    if (!s.empty()) {
      const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(s.back())));
      mult = u == 'K'   ? int64_t{1} << 10
             : u == 'M' ? int64_t{1} << 20
             : u == 'G' ? int64_t{1} << 30
                        : 1;
      if (mult > 1) s.pop_back();
    }
    int64_t x = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
    if (s.empty() || ec != std::errc() || end != s.data() + s.size() || x <= 0 ||
        x > (int64_t{1} << 50) / mult) {
      fail(full(key),
           "expected a byte count (an integer > 0, optionally with K, M or G), got " + shown(v));
    }
    return x * mult;
  }

  const YAML::Node& node() const { return node_; }

 private:
  std::string name_;
  YAML::Node node_;
  std::set<std::string> seen_;
};

void read_model(const YAML::Node& root, ServerConfig& c) {
  Section s(root, "model");
  c.model.path = s.string("path");
  if (c.model.path.empty()) fail("model.path", "expected a model directory, got ''");
  c.model.served_name = s.string("served_name", /*allow_null=*/true);
  c.model.dummy_weights = s.choice("load_format", {"safetensors", "dummy"}) == "dummy";
  s.done();
}

void read_server(const YAML::Node& root, ServerConfig& c) {
  Section s(root, "server");
  ServerConfig::Server& v = c.server;
  v.host = s.string("host");
  v.port = static_cast<uint16_t>(s.integer("port", 0, 65535, "a port number"));
  v.grpc_port = static_cast<uint16_t>(s.integer("grpc_port", 0, 65535, "a port number"));
  const std::string key = s.string("api_key", /*allow_null=*/true);
  if (!key.empty()) v.api_key = key;
  v.max_body_bytes = s.bytes("max_body_bytes");
  v.max_n = static_cast<int32_t>(s.integer("max_n", 1, 1 << 16, "an integer"));
  v.io_threads = static_cast<int32_t>(s.integer("io_threads", 1, 1024, "an integer"));
  v.request_timeout_s = s.number("request_timeout_s");
  v.shutdown_grace_s = s.number("shutdown_grace_s");
  s.done();
}

void read_scheduler(const YAML::Node& root, ServerConfig& c) {
  Section s(root, "scheduler");
  SchedulerConfig& v = c.scheduler;
  const int64_t big = int64_t{1} << 30;
  v.max_running = static_cast<int32_t>(s.integer("max_running", 1, big, "an integer"));
  v.max_step_tokens = static_cast<int32_t>(s.integer("max_step_tokens", 1, big, "an integer"));
  v.prefill_chunk = static_cast<int32_t>(s.integer("prefill_chunk", 1, big, "an integer"));
  v.max_waiting = static_cast<int32_t>(s.integer("max_waiting", 1, big, "an integer"));
  v.admission = s.choice("admission", {"guaranteed", "overcommit"}) == "guaranteed"
                    ? SchedulerConfig::Admission::kGuaranteed
                    : SchedulerConfig::Admission::kOvercommit;
  s.done();
}

// kv_cache: `memory` here, every other key through kv::parse_kv_config_yaml (one parser for the
// section, shared with `pmkv generate/eval --kv-config`).
void read_kv_cache(const YAML::Node& root, ServerConfig& c) {
  Section s(root, "kv_cache");
  c.kv_memory_bytes = s.bytes("memory");
  YAML::Node rest(YAML::NodeType::Map);
  if (s.node().IsMap()) {
    for (const auto& kv : s.node()) {
      const std::string key = kv.first.as<std::string>();
      // null = the default (kv_cache.budget: null, kv_cache.key_scales: null)
      if (key != "memory" && !kv.second.IsNull()) rest[key] = kv.second;
    }
  }
  YAML::Node doc(YAML::NodeType::Map);
  doc["kv_cache"] = rest;
  YAML::Emitter out;
  out << doc;
  c.kv_cache = kv::parse_kv_config_yaml(out.c_str(), "config error");
}

void read_engine_and_logging(const YAML::Node& root, ServerConfig& c) {
  Section e(root, "engine");
  const int64_t big = int64_t{1} << 30;
  c.engine.threads = static_cast<int32_t>(e.integer("threads", 0, 4096, "an integer"));
  c.engine.max_model_len = static_cast<int32_t>(e.integer("max_model_len", 0, big, "an integer"));
  c.engine.device = parse_device(e.choice("device", {"auto", "cpu", "cuda"}), "engine.device");
  c.engine.cuda_graphs = e.boolean("cuda_graphs");
  const std::string async = e.choice("async_steps", {"auto", "on", "off"});
  c.engine.async_steps = async == "on"    ? EngineOptions::AsyncSteps::kOn
                         : async == "off" ? EngineOptions::AsyncSteps::kOff
                                          : EngineOptions::AsyncSteps::kAuto;
  e.done();
  Section l(root, "logging");
  c.logging.level =
      l.choice("level", {"trace", "debug", "info", "warn", "error", "critical", "off"});
  c.logging.access_log = l.boolean("access_log");
  l.done();
}

ServerConfig from_yaml(const YAML::Node& root) {
  static const std::set<std::string> kSections = {"model",    "server", "scheduler",
                                                  "kv_cache", "engine", "logging"};
  if (!root.IsMap()) throw InvalidArgument("config error: expected a mapping of sections");
  for (const auto& kv : root) {
    const std::string key = kv.first.as<std::string>();
    if (!kSections.contains(key)) fail(key, "unknown section");
  }
  ServerConfig c;
  read_model(root, c);
  read_server(root, c);
  read_scheduler(root, c);
  read_kv_cache(root, c);
  read_engine_and_logging(root, c);
  return c;
}

ServerConfig build(const std::optional<YAML::Node>& user,
                   const std::vector<std::string>& overrides) {
  YAML::Node root = load(std::string(default_config_yaml()), "config/default.yaml (built in)");
  if (user && !user->IsNull()) {
    if (!user->IsMap()) throw InvalidArgument("config error: expected a mapping of sections");
    merge(root, *user);
  }
  for (const std::string& o : overrides)
    apply_override(root, o);
  return from_yaml(root);
}

}  // namespace

EngineOptions ServerConfig::engine_options() const {
  EngineOptions o;
  o.scheduler = scheduler;
  o.kv = kv_cache;
  o.kv_memory_bytes = kv_memory_bytes;
  o.num_threads = engine.threads;
  o.device = engine.device;
  o.dummy_weights = model.dummy_weights;
  o.cuda_graphs = engine.cuda_graphs;
  o.async_steps = engine.async_steps;
  o.max_model_len = engine.max_model_len;
  return o;
}

ServerConfig parse_server_config(const std::optional<std::string>& yaml_text,
                                 const std::string& source,
                                 const std::vector<std::string>& overrides) {
  std::optional<YAML::Node> user;
  if (yaml_text) user = load(*yaml_text, source);
  return build(user, overrides);
}

ServerConfig load_server_config(const std::optional<std::filesystem::path>& file,
                                const std::vector<std::string>& overrides) {
  std::optional<YAML::Node> user;
  if (file) {
    std::ifstream in(*file);
    if (!in) throw InvalidArgument("config error: cannot read " + file->string());
    std::stringstream ss;
    ss << in.rdbuf();
    user = load(ss.str(), file->string());
    resolve_paths(*user, file->parent_path());
  }
  return build(user, overrides);
}

}  // namespace pmkv
