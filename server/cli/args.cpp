#include "server/cli/args.h"

#include <charconv>
#include <cmath>

#include "engine/common/error.h"

namespace pmkv::cli {

Args::Args(const std::vector<std::string>& argv, const Spec& spec) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.rfind("--", 0) != 0 || a.size() == 2) {
      throw InvalidArgument("unexpected argument '" + a + "'");
    }
    std::string name = a.substr(2), value;
    bool inline_value = false;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    if (spec.flags.contains(name)) {
      if (inline_value) throw InvalidArgument("option --" + name + " takes no value");
      flags_.insert(name);
      continue;
    }
    const bool single = spec.values.contains(name);
    if (!single && !spec.repeatable.contains(name)) {
      throw InvalidArgument("unknown option --" + name);
    }
    if (!inline_value) {
      if (i + 1 >= argv.size()) throw InvalidArgument("option --" + name + " needs a value");
      value = argv[++i];
    }
    auto& slot = values_[name];
    if (single && !slot.empty()) throw InvalidArgument("option --" + name + " given twice");
    slot.push_back(value);
  }
}

std::optional<std::string> Args::get(const std::string& name) const {
  const auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second.front();
}

std::vector<std::string> Args::all(const std::string& name) const {
  const auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

std::string Args::require(const std::string& name) const {
  auto v = get(name);
  if (!v) throw InvalidArgument("missing required option --" + name);
  return *v;
}

std::optional<int64_t> Args::get_int(const std::string& name) const {
  const auto v = get(name);
  if (!v) return std::nullopt;
  int64_t out = 0;
  const auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
  if (ec != std::errc() || p != v->data() + v->size()) {
    throw InvalidArgument("option --" + name + ": '" + *v + "' is not an integer");
  }
  return out;
}

std::optional<double> Args::get_double(const std::string& name) const {
  const auto v = get(name);
  if (!v) return std::nullopt;
  double out = 0;
  const auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
  if (ec != std::errc() || p != v->data() + v->size() || !std::isfinite(out)) {
    throw InvalidArgument("option --" + name + ": '" + *v + "' is not a number");
  }
  return out;
}

std::vector<int32_t> parse_id_list(const std::string& s, const std::string& what) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    int32_t id = 0;
    const auto [p, ec] = std::from_chars(s.data() + pos, s.data() + comma, id);
    if (ec != std::errc() || p != s.data() + comma || comma == pos) {
      throw InvalidArgument(what + ": '" + s + "' is not a comma-separated list of token ids");
    }
    ids.push_back(id);
    pos = comma + 1;
  }
  return ids;
}

}  // namespace pmkv::cli
