#include "engine/sampling/stop_checker.h"

#include <algorithm>
#include <stdexcept>

namespace pmkv {

std::string_view to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
  }
  return "unknown";
}

StopChecker::StopChecker(const SamplingParams& params, std::span<const int32_t> eos_ids)
    : stop_(params.stop),
      stop_token_ids_(params.stop_token_ids),
      include_stop_(params.include_stop_str_in_output),
      max_tokens_(params.max_tokens) {
  if (!params.ignore_eos) eos_ids_.assign(eos_ids.begin(), eos_ids.end());
  std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
  for (const auto& s : stop_) {
    max_stop_len_ = std::max(max_stop_len_, s.size());
  }
}

bool StopChecker::find_stop(const std::string& buffer, StopUpdate& out) const {
  size_t best_start = std::string::npos;
  size_t best_end = std::string::npos;
  const std::string* best = nullptr;
  for (const auto& s : stop_) {
    const size_t pos = buffer.find(s);
    if (pos == std::string::npos) continue;
    const size_t end = pos + s.size();
    if (best == nullptr || end < best_end || (end == best_end && pos < best_start)) {
      best = &s;
      best_start = pos;
      best_end = end;
    }
  }
  if (best == nullptr) return false;
  out.text = buffer.substr(0, include_stop_ ? best_end : best_start);
  out.finish = FinishReason::kStop;
  out.stop_string = *best;
  return true;
}

size_t StopChecker::holdback_length(std::string_view buffer) const {
  if (max_stop_len_ == 0) return 0;
  for (size_t len = std::min(buffer.size(), max_stop_len_ - 1); len > 0; --len) {
    const std::string_view tail = buffer.substr(buffer.size() - len);
    for (const auto& s : stop_) {
      if (s.size() > len && std::string_view(s).starts_with(tail)) return len;
    }
  }
  return 0;
}

StopUpdate StopChecker::append(int32_t token_id, std::string_view text) {
  if (finished_) throw std::logic_error("StopChecker::append after the sequence finished");
  ++generated_;
  StopUpdate out;

  const bool is_eos = std::find(eos_ids_.begin(), eos_ids_.end(), token_id) != eos_ids_.end();
  const bool is_stop_token =
      std::find(stop_token_ids_.begin(), stop_token_ids_.end(), token_id) != stop_token_ids_.end();
  if (is_eos || is_stop_token) {
    out.text = std::move(held_);
    if (include_stop_) out.text += text;
    out.finish = FinishReason::kStop;
    if (!is_eos) out.stop_token = token_id;
    held_.clear();
    finished_ = true;
    return out;
  }

  std::string buffer = std::move(held_);
  held_.clear();
  buffer += text;
  if (find_stop(buffer, out)) {
    finished_ = true;
    return out;
  }
  if (generated_ >= max_tokens_) {
    out.text = std::move(buffer);
    out.finish = FinishReason::kLength;
    finished_ = true;
    return out;
  }
  const size_t hold = holdback_length(buffer);
  held_ = buffer.substr(buffer.size() - hold);
  buffer.resize(buffer.size() - hold);
  out.text = std::move(buffer);
  return out;
}

StopUpdate StopChecker::finish(FinishReason reason, std::string_view tail) {
  if (finished_) throw std::logic_error("StopChecker::finish after the sequence finished");
  finished_ = true;
  StopUpdate out;
  std::string buffer = std::move(held_);
  held_.clear();
  buffer += tail;
  if (find_stop(buffer, out)) return out;
  out.text = std::move(buffer);
  out.finish = reason;
  return out;
}

}  // namespace pmkv
