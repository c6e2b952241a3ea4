#include "server/http/json_fields.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace pmkv::http {
namespace {

const Json* find(const Json& obj, std::string_view name) {
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

[[noreturn]] void wrong_type(std::string_view name, std::string_view expected, const Json& v) {
  throw bad_request(
      "'" + std::string(name) + "' must be " + std::string(expected) + ", got " + type_name(v),
      std::string(name));
}

size_t utf8_length(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;
}

// The deepest nesting of arrays and objects in a JSON text (brackets inside strings skipped). A
// malformed text gets some number; the parser reports what is wrong with it.
size_t nesting_depth(std::string_view s) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : s) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

}  // namespace

bool valid_utf8(std::string_view s, size_t* bad_offset) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t len = utf8_length(c);
    bool ok = len != 0 && i + len <= s.size();
    uint32_t cp = len == 1 ? c : (c & (0x7Fu >> len));
    for (size_t k = 1; ok && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    ok = ok && !(len == 3 && cp < 0x800) && !(len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) &&
         !(cp >= 0xD800 && cp <= 0xDFFF);
    if (!ok) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    i += len;
  }
  return true;
}

Json parse_body(std::string_view body) {
  size_t bad = 0;
  if (!valid_utf8(body, &bad)) {
    throw bad_request("request body is not valid UTF-8 (first bad byte at offset " +
                      std::to_string(bad) + ")");
  }
  // Copying, comparing or printing a nlohmann::json recurses once a level: a chat message whose
  // content was 400,000 nested arrays (an 800 KB body) overflowed an IO thread's stack.
  if (nesting_depth(body) > kMaxJsonDepth) {
    throw bad_request("request body nests arrays and objects deeper than " +
                      std::to_string(kMaxJsonDepth) + " levels");
  }
  Json j;
  try {
    j = Json::parse(body);
  } catch (const Json::exception& e) {
    // parse_error, and out_of_range for a number beyond a double (1e400), which the parser
    // throws even when asked not to: it once escaped and ended the server.
    throw bad_request(std::string("request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw bad_request("request body must be a JSON object, got " + type_name(j));
  return j;
}

std::string type_name(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "boolean";
    case Json::value_t::string:
      return "string";
    case Json::value_t::array:
      return "array";
    case Json::value_t::object:
      return "object";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "integer";
    case Json::value_t::number_float:
      return "number";
    default:
      return "unknown";
  }
}

void reject_unknown_fields(const Json& obj, std::initializer_list<std::string_view> known,
                           std::string_view what) {
  std::string unknown;
  std::string first;
  for (const auto& [key, value] : obj.items()) {
    bool found = false;
    for (std::string_view k : known)
      found = found || k == key;
    if (found) continue;
    if (first.empty()) first = key;
    unknown += (unknown.empty() ? "" : ", ") + key;
  }
  if (unknown.empty()) return;
  std::string msg = "Unrecognized request argument(s) supplied";
  if (!what.empty()) msg += " in " + std::string(what);
  throw bad_request(msg + ": " + unknown, first);
}

std::optional<bool> get_bool(const Json& obj, std::string_view name) {
  const Json* v = find(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrong_type(name, "a boolean", *v);
  return v->get<bool>();
}

std::optional<std::string> get_string(const Json& obj, std::string_view name) {
  const Json* v = find(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_string()) wrong_type(name, "a string", *v);
  return v->get<std::string>();
}

std::optional<double> get_number(const Json& obj, std::string_view name) {
  const Json* v = find(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) wrong_type(name, "a number", *v);
  return v->get<double>();
}

int64_t as_int(const Json& v, std::string_view what, int64_t min, int64_t max) {
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    x = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
            ? std::numeric_limits<int64_t>::max()
            : static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
  } else if (v.is_number_float() && std::isfinite(v.get<double>()) &&
             std::floor(v.get<double>()) == v.get<double>() && std::fabs(v.get<double>()) < 9e18) {
    x = static_cast<int64_t>(v.get<double>());
  } else {
    wrong_type(what, "an integer", v);
  }
  if (x < min || x > max) {
    throw bad_request("'" + std::string(what) + "' must be in [" + std::to_string(min) + ", " +
                          std::to_string(max) + "], got " + v.dump(),
                      std::string(what));
  }
  return x;
}

std::optional<int64_t> get_int(const Json& obj, std::string_view name, int64_t min, int64_t max) {
  const Json* v = find(obj, name);
  if (!v) return std::nullopt;
  return as_int(*v, name, min, max);
}

std::optional<std::vector<std::string>> get_string_list(const Json& obj, std::string_view name) {
  const Json* v = find(obj, name);
  if (!v) return std::nullopt;
  if (v->is_string()) return std::vector<std::string>{v->get<std::string>()};
  if (!v->is_array()) wrong_type(name, "a string or an array of strings", *v);
  std::vector<std::string> out;
  for (const Json& e : *v) {
    if (!e.is_string()) wrong_type(name, "a string or an array of strings", e);
    out.push_back(e.get<std::string>());
  }
  return out;
}

std::optional<std::vector<int32_t>> get_int_list(const Json& obj, std::string_view name,
                                                 int64_t min, int64_t max) {
  const Json* v = find(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_array()) wrong_type(name, "an array of integers", *v);
  std::vector<int32_t> out;
  for (const Json& e : *v)
    out.push_back(static_cast<int32_t>(as_int(e, name, min, max)));
  return out;
}

std::string dump(const Json& v) {
  return v.dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace pmkv::http
