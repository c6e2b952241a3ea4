#include "engine/sampling/sampling_params.h"

#include <cmath>
#include <sstream>
#include <string_view>

#include "engine/common/error.h"

namespace pmkv {
namespace {

template <typename T>
[[noreturn]] void reject(std::string_view name, std::string_view rule, const T& value) {
  std::ostringstream msg;
  msg << name << " " << rule << ", got " << value;
  throw InvalidArgument(msg.str());
}

// Well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF).
bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      len = 1;
      cp = c;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1Fu;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0Fu;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

}  // namespace

void SamplingParams::validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    reject("temperature", "must be a finite number >= 0", temperature);
  }
  if (top_k < -1) reject("top_k", "must be -1 or 0 (disabled) or a positive count", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) reject("top_p", "must be in (0, 1]", top_p);
  if (!(min_p >= 0.0f && min_p <= 1.0f)) reject("min_p", "must be in [0, 1]", min_p);
  if (!std::isfinite(repetition_penalty) || !(repetition_penalty > 0.0f)) {
    reject("repetition_penalty", "must be a finite number > 0", repetition_penalty);
  }
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    reject("presence_penalty", "must be in [-2, 2]", presence_penalty);
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    reject("frequency_penalty", "must be in [-2, 2]", frequency_penalty);
  }
  if (max_tokens < 1) reject("max_tokens", "must be >= 1", max_tokens);
  for (size_t i = 0; i < stop.size(); ++i) {
    const std::string name = "stop[" + std::to_string(i) + "]";
    if (stop[i].empty()) throw InvalidArgument(name + " is empty; stop strings must not be empty");
    if (!valid_utf8(stop[i])) throw InvalidArgument(name + " is not valid UTF-8");
  }
  for (int32_t id : stop_token_ids) {
    if (id < 0) reject("stop_token_ids", "must be token ids >= 0", id);
  }
}

}  // namespace pmkv
