#pragma once
// PenaltyHistory: the per-row token history a device sampler's penalties read (kernels/sampling:
// hist_starts / hist_ids / hist_output_counts / hist_in_prompt), built row by row. Each row lists
// every DISTINCT id of its output (with its number of occurrences) and, with a repetition
// penalty, of its prompt (flagged), in first-seen order.
//
// Counting goes through vocab-sized scratch arrays that are zero between rows, and a row's cost
// is O(its history): at batch 64 with long outputs a hash map per row cost ~1 ms a step.
#include <cstdint>
#include <span>
#include <vector>

namespace pmkv {

class PenaltyHistory {
 public:
  // Forgets the rows (keeps the capacity); `vocab` bounds the ids.
  void reset(int32_t vocab);
  // Appends one row: `output` counted, `prompt` flagged (pass an empty span when there is no
  // repetition penalty). Throws InvalidArgument naming the history when an id is outside the
  // vocabulary; the row is then not added.
  void add_row(std::span<const int32_t> output, std::span<const int32_t> prompt);

  // CSR over the rows added: row r's entries are [starts()[r], starts()[r + 1]).
  const std::vector<int32_t>& starts() const { return starts_; }
  const std::vector<int32_t>& ids() const { return ids_; }
  const std::vector<int32_t>& output_counts() const { return counts_; }
  const std::vector<uint8_t>& in_prompt() const { return in_prompt_; }

 private:
  int32_t vocab_ = 0;
  std::vector<int32_t> starts_{0}, ids_, counts_;
  std::vector<uint8_t> in_prompt_;
  std::vector<int32_t> count_of_;   // [vocab] scratch, zero between rows
  std::vector<uint8_t> prompt_of_;  // [vocab] scratch, zero between rows
  std::vector<int32_t> seen_;       // the ids a row touched, first-seen order
};

}  // namespace pmkv
