#pragma once
// StepBatch: everything a backend needs for one forward step, as plain arrays (the seam between the
// engine loop and the backends; the CUDA backend uploads these as is).
//
// Tokens of all sequences are flattened: sequence s owns rows [seq_starts[s], seq_starts[s+1]).
// Sequence s had seq_cached[s] tokens in the KV cache before this step; its new tokens are
// appended after them, so the new row r of s is token index seq_cached[s] + (r - seq_starts[s]) of
// the sequence. Prefill (many rows), decode (one row) and chunked prefill are the same thing.
//
// Page tables, CSR over (layer, sequence): the pages of layer l of sequence s, in token order, are
// pages[page_starts[l * num_seqs + s] .. page_starts[l * num_seqs + s + 1]). They already cover the
// new tokens: the last (rows of s) token slots of each table are where this step writes its K/V.
#include <cstdint>
#include <vector>

#include "engine/kv/page_table.h"

namespace pmkv {

struct StepBatch {
  std::vector<int32_t> token_ids;    // [num_tokens]
  std::vector<int32_t> positions;    // [num_tokens] RoPE positions
  std::vector<int32_t> seq_starts;   // [num_seqs + 1]
  std::vector<int32_t> seq_cached;   // [num_seqs]
  std::vector<int32_t> page_starts;  // [num_layers * num_seqs + 1]
  std::vector<kv::PageRef> pages;
  std::vector<int32_t> logit_rows;  // rows whose logits the caller wants, in output order

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(seq_cached.size()); }
};

}  // namespace pmkv
