#pragma once
// StepBatch: everything a backend needs for one forward step, as plain arrays (the seam between the
// engine loop and the backends; the CUDA backend uploads these as is).
//
// Tokens of all sequences are flattened: sequence s owns rows [seq_starts[s], seq_starts[s+1]).
// Sequence s had seq_cached[s] tokens in the KV cache before this step; its new tokens are
// appended after them, so the new row r of s is token index seq_cached[s] + (r - seq_starts[s]) of
// the sequence. Prefill (many rows), decode (one row) and chunked prefill are the same thing.
//
// Per layer, a backend (1) writes the K/V of the new rows to their 16-bit slots, listed by `writes`
// (CSR over (layer, sequence) like the tables, in row order); (2) runs kv_ops.layers[l]: the flush
// requantizations, then each demotion wave; (3) attends: cached tokens through the final page
// tables, the step's own tokens at full precision.
//
// Final page tables, CSR over (layer, sequence): the pages of layer l of sequence s, in token
// order, are pages[page_starts[l * num_seqs + s] .. page_starts[l * num_seqs + s + 1]), covering
// the cached tokens and the new ones (the last rows-of-s tokens).
#include <cstdint>
#include <vector>

#include "engine/kv/kv_cache_manager.h"
#include "engine/kv/page_table.h"

namespace pmkv {

struct StepBatch {
  std::vector<int32_t> token_ids;  // [num_tokens]
  // Empty, or [num_tokens]: token_src[r] >= 0 says row r's token is the one the previous launched
  // step sampled in its row token_src[r], known on the device only when this step is built
  // (Backend::launch_sample); token_ids[r] is then a placeholder.
  std::vector<int32_t> token_src;
  std::vector<int32_t> positions;    // [num_tokens] RoPE positions
  std::vector<int32_t> seq_starts;   // [num_seqs + 1]
  std::vector<int32_t> seq_cached;   // [num_seqs]
  std::vector<int32_t> page_starts;  // [num_layers * num_seqs + 1]
  std::vector<kv::PageRef> pages;
  std::vector<int32_t> write_starts;  // [num_layers * num_seqs + 1]
  std::vector<kv::KvWrite> writes;
  kv::KvStepOps kv_ops;             // [num_layers]: flushes, then demotion waves
  std::vector<int32_t> logit_rows;  // rows whose logits the caller wants, in output order
  // Sequences (indices into this batch) whose KV budget could not hold them even at the floor
  // bits: the caller ends them (floor action) after the step instead of sampling.
  std::vector<int32_t> over_budget;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(seq_cached.size()); }
};

}  // namespace pmkv
