#pragma once
// KvCacheManager: per (sequence, layer) page tables over one PagePool. It decides which pages hold
// which tokens; it never touches bytes (the backend writes and reads them through the tables).
// Owned by the engine thread.
//
// This is the plain cache: every page at 16 bits, no budget. Invariants after every call:
//   - pool().num_used() == sum over live sequences and layers of their pages;
//   - every layer of a sequence holds exactly num_tokens(seq) tokens;
//   - a failed append changes nothing.
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "engine/kv/page_pool.h"
#include "engine/kv/page_table.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::kv {

using SeqId = uint64_t;

class KvCacheManager {
 public:
  KvCacheManager(int32_t num_layers, PageGeometry geometry, int32_t num_pages);

  // Pages that appending n tokens to `seq` (new or existing) would take from the pool.
  int32_t pages_needed(SeqId seq, int32_t n) const;
  bool can_append(SeqId seq, int32_t n) const { return pages_needed(seq, n) <= pool_.num_free(); }
  // Makes room for n more tokens of `seq` in every layer (creating the sequence on first use).
  // Returns false, changing nothing, when the pool has too few free pages.
  bool append(SeqId seq, int32_t n);
  // Returns every page of `seq` to the pool. Unknown ids are ignored.
  void release(SeqId seq);

  bool contains(SeqId seq) const { return seqs_.contains(seq); }
  int32_t num_tokens(SeqId seq) const;
  std::span<const PageRef> table(SeqId seq, int32_t layer) const;
  int32_t num_sequences() const { return static_cast<int32_t>(seqs_.size()); }

  int32_t num_layers() const { return num_layers_; }
  const PageGeometry& geometry() const { return geometry_; }
  const PagePool& pool() const { return pool_; }

 private:
  struct SeqState {
    int32_t num_tokens = 0;
    std::vector<std::vector<PageRef>> layers;  // [num_layers][pages in token order]
  };
  int32_t num_layers_;
  PageGeometry geometry_;
  PagePool pool_;
  std::unordered_map<SeqId, SeqState> seqs_;
};

}  // namespace pmkv::kv
