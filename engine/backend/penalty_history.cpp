#include "engine/backend/penalty_history.h"

#include <string>

#include "engine/common/error.h"

namespace pmkv {

void PenaltyHistory::reset(int32_t vocab) {
  vocab_ = vocab;
  starts_.assign(1, 0);
  ids_.clear();
  counts_.clear();
  in_prompt_.clear();
  if (count_of_.size() < static_cast<size_t>(vocab)) {
    count_of_.assign(static_cast<size_t>(vocab), 0);
    prompt_of_.assign(static_cast<size_t>(vocab), 0);
  }
}

void PenaltyHistory::add_row(std::span<const int32_t> output, std::span<const int32_t> prompt) {
  seen_.clear();
  // The scratch must be zero again whatever happens: undo what this row touched on the way out.
  auto undo = [&] {
    for (int32_t id : seen_) {
      count_of_[id] = 0;
      prompt_of_[id] = 0;
    }
  };
  for (int32_t id : output) {
    if (id < 0 || id >= vocab_) {
      undo();
      throw InvalidArgument("history token id " + std::to_string(id) + " out of range");
    }
    if (count_of_[id]++ == 0) seen_.push_back(id);
  }
  for (int32_t id : prompt) {
    if (id < 0 || id >= vocab_) {
      undo();
      throw InvalidArgument("prompt token id " + std::to_string(id) + " out of range");
    }
    if (prompt_of_[id] != 0) continue;
    if (count_of_[id] == 0) seen_.push_back(id);
    prompt_of_[id] = 1;
  }
  for (int32_t id : seen_) {
    ids_.push_back(id);
    counts_.push_back(count_of_[id]);
    in_prompt_.push_back(prompt_of_[id]);
  }
  undo();
  starts_.push_back(static_cast<int32_t>(ids_.size()));
}

}  // namespace pmkv
