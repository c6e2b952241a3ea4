#pragma once
// KvCacheManager: per (sequence, layer) page tables over one PagePool, with PM-KVQ's progressive
// mixed precision. It decides which pages hold which tokens at which bits and plans the byte work
// (window flushes, demotions) as plain ops for the backend; it never touches bytes.
// Owned by the engine thread; not thread-safe.
//
// One (sequence, layer) table, in token order: [sink pages | body pages | window pages].
//  - sink: the first sink_tokens tokens, 16-bit, never demoted;
//  - window: the newest tokens, 16-bit pages; whenever it holds window_tokens tokens they are
//    flushed into the body (requantized to the bits they enter at);
//  - body: pages of one bit-width each. Policy `block`: every body page is at the layer's body
//    bits; flushes enter at it; when the layer's pages exceed its budget the whole body drops as
//    many steps as needed. Policy `oldest_first`: flushes enter at the newest body page's bits
//    (init_bits at first); over budget, pairs of the oldest same-bit body pages above the floor
//    fold into one page, until under budget (so bits never decrease from old to new).
//  - At the floor and still over budget: append() reports kOverBudgetAtFloor (floor action).
//  - A step's flushes and demotions run after its forward: its attention reads the tables as they
//    were before them (attention_table), plus its own new tokens.
//  - A held prompt (kv_cache.hold_prompt, append()'s prompt_len): until the sequence holds its
//    whole prompt the window keeps every token (no flush, no budget check); the append that
//    completes the prompt flushes and demotes as a single append of the whole prompt would. So
//    the prompt attends to itself at 16 bits (PM-KVQ's single-pass prefill) and the tables after
//    the prompt do not depend on how it was chunked.
// Invariants after every end_step() (tested property-style): no live (sequence, layer) holds
// more page bytes than its budget (those reported over budget are released by the caller; a
// held prompt is exempt until its last chunk); a token's bits never go up; sink and window tokens
// are at 16 bits; pool used pages == sum of live sequences' pages; release() returns every page.
#include <array>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "engine/kv/kv_config.h"
#include "engine/kv/page_ops.h"
#include "engine/kv/page_pool.h"
#include "engine/kv/page_table.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::kv {

using SeqId = uint64_t;

// The byte work of one step for one layer, over all its sequences: first every flush, then the
// demotion waves in order. Ops inside the flush set or inside one wave are independent (a GPU runs
// each as one launch); wave k+1 may read pages wave k wrote.
struct KvLayerOps {
  std::vector<RequantOp> requant;
  std::vector<std::vector<DemoteOp>> demote_waves;
};
struct KvStepOps {
  std::vector<KvLayerOps> layers;  // [num_layers]
  bool empty() const;
};

enum class AppendStatus { kOk, kPoolExhausted, kOverBudgetAtFloor };

// Bits ladder index used by the stats arrays: 16, 8, 4, 2.
inline constexpr std::array<int, 4> kStatBits = {16, 8, 4, 2};
int stat_index(int bits);

struct LayerKvStats {
  int32_t pages = 0;
  int64_t bytes = 0;
  int64_t budget_bytes = -1;  // -1: no budget
  std::array<int64_t, 4> tokens_by_bits{};
  std::array<int64_t, 4> pages_by_bits{};
};
struct SeqKvStats {
  std::vector<LayerKvStats> layers;
  int64_t demotions = 0;  // demotion ops applied to this sequence's pages
};
struct KvPoolStats {
  int32_t pages_total = 0;
  int32_t pages_used = 0;   // live + pages waiting for end_step()
  int32_t pages_peak = 0;
  int64_t page_bytes = 0;
  std::array<int64_t, 4> tokens_by_bits{};  // over live sequences
  std::array<int64_t, 4> pages_by_bits{};
  std::vector<LayerKvStats> layers;         // summed over live sequences (budget_bytes: per seq)
  int64_t demotions_total = 0;
  int64_t flushes_total = 0;
  int32_t num_sequences = 0;
};

class KvCacheManager {
 public:
  // `layer_budgets`: bytes per (sequence, layer) (resolve_layer_budgets), empty = no budget.
  KvCacheManager(int32_t num_layers, PageGeometry geometry, int32_t num_pages,
                 KvCacheConfig config = {}, std::vector<int64_t> layer_budgets = {});

  // An upper bound of the pages appending n tokens to `seq` takes from the pool this step (held
  // prompt or not: holding only skips flushes, which would take pages).
  int32_t pages_needed(SeqId seq, int32_t n) const;
  bool can_append(SeqId seq, int32_t n) const { return pages_needed(seq, n) <= pool_.num_free(); }
  // Appends n tokens to every layer of `seq` (created on first use), planning this step's flush
  // and demotion ops into `ops` (which must have num_layers() entries, or be null when the config
  // can never produce ops: no budget and init_bits 16). kPoolExhausted: nothing changed.
  // `writes` (num_layers entries, appended to) receives where the new tokens' K/V go.
  // `prompt_len`: the sequence's first prompt_len tokens are its prompt, held at 16 bits until
  // all are appended when the config's hold_prompt is set (0: nothing held).
  AppendStatus append(SeqId seq, int32_t n, KvStepOps* ops,
                      std::vector<std::vector<KvWrite>>* writes, int32_t prompt_len = 0);
  // Returns to the pool the pages this step's ops freed (they are read by the ops, so they stay
  // allocated until the backend ran them).
  void end_step();
  // Returns every page of `seq` (after the step's ops ran). Unknown ids are ignored.
  void release(SeqId seq);

  // Global pool pressure (the scheduler, over-committed): demotes bodies across live sequences
  // one ladder step at a time until `pages_wanted` pages will be freed, sequences with the most
  // 16/8-bit body pages first. A (sequence, layer) folds block-style: policy block halves its
  // whole body's bits (16 -> 8: two pages -> one); oldest_first folds each adjacent same-bit pair
  // above the floor. Call after the step's appends: the ops go to `ops` as new demotion waves
  // after those already planned, the freed pages return at end_step(), and the step's page tables
  // must be read after this call. Returns the pages that will be freed (may fall short of
  // pages_wanted, 0 when every body is at the floor).
  int32_t demote_for_pressure(int32_t pages_wanted, KvStepOps* ops);
  // What demote_for_pressure could free now at most (every body one step down).
  int32_t pressure_demotable_pages() const;

  // Runtime budget change (admin call); applies from the next append. Empty = no budget.
  void set_layer_budgets(std::vector<int64_t> budgets);
  const std::vector<int64_t>& layer_budgets() const { return budgets_; }

  bool contains(SeqId seq) const { return seqs_.contains(seq); }
  int32_t num_tokens(SeqId seq) const;
  std::span<const PageRef> table(SeqId seq, int32_t layer) const;
  // The table this step's attention reads: `table` as it was after this step's new tokens were
  // placed and before its flushes and demotions (which the backend runs after the forward, so
  // that a step reads the cache as it was before it, as PM-KVQ's reference does). Equal to
  // `table` when the step planned no op for that layer; valid until end_step().
  std::span<const PageRef> attention_table(SeqId seq, int32_t layer) const;
  int32_t num_sequences() const { return static_cast<int32_t>(seqs_.size()); }
  SeqKvStats seq_stats(SeqId seq) const;
  KvPoolStats pool_stats() const;

  int32_t num_layers() const { return num_layers_; }
  const PageGeometry& geometry() const { return geometry_; }
  const KvCacheConfig& config() const { return config_; }
  const PagePool& pool() const { return pool_; }
  int64_t page_bytes() const { return page_bytes_; }
  bool needs_ops() const;

 private:
  struct Layer {
    std::vector<PageRef> pages;  // sink | body | window, token order
    int32_t num_sink_pages = 0;
    int32_t num_body_pages = 0;
    int32_t sink_tokens = 0;
    int32_t window_tokens = 0;
    int32_t body_bits = 16;      // block: the body's bits (oldest_first: unused)
    // `pages` before the flushes and demotions of step `attention_step` (attention_table).
    std::vector<PageRef> attention_pages;
    uint64_t attention_step = UINT64_MAX;
  };
  struct Seq {
    int32_t num_tokens = 0;
    std::vector<Layer> layers;
    int64_t demotions = 0;
  };
  const Seq& live_seq(SeqId seq, const char* caller) const;  // std::out_of_range if unknown
  bool append_layer(Seq& s, Layer& L, int32_t layer, int32_t n, bool hold, KvLayerOps* ops,
                    std::vector<KvWrite>* writes);
  void flush(Layer& L, KvLayerOps* ops);
  bool over_budget(const Layer& L, int32_t layer) const;
  bool demote_block(Seq& s, Layer& L, int32_t layer, KvLayerOps* ops);
  bool demote_oldest(Seq& s, Layer& L, int32_t layer, KvLayerOps* ops);
  std::vector<DemoteOp> fold_body(Seq& s, Layer& L, int32_t group, int32_t bits);
  std::vector<DemoteOp> fold_pairs(Seq& s, Layer& L);
  int32_t pressure_gain(const Layer& L) const;
  PageId take_page();
  DemoteOp fold_pair(Layer& L, int32_t i);
  int32_t enter_bits(const Layer& L) const;  // bits the next flush of L enters the body at
  int32_t layer_pages_needed(const Layer& L, int32_t n) const;
  int32_t lower_bits(int32_t bits) const;  // next ladder step below, or 0 at the floor

  int32_t num_layers_;
  PageGeometry geometry_;
  KvCacheConfig config_;
  std::vector<int64_t> budgets_;
  int64_t page_bytes_;
  PagePool pool_;
  std::unordered_map<SeqId, Seq> seqs_;
  std::vector<PageId> pending_free_;
  uint64_t step_ = 0;  // end_step() calls so far
  int64_t demotions_total_ = 0;
  int64_t flushes_total_ = 0;
};

// The tokens one (sequence, layer) holds under `budget_bytes` before append() reports
// kOverBudgetAtFloor, found by appending one token at a time (as decode steps do) to a scratch
// manager of one layer: the length at which the floor action ends a chain. `max_tokens` when the
// budget holds that many. What an operator's budget means in tokens (the engine logs it).
int64_t chain_tokens_at_floor(const KvCacheConfig& config, const PageGeometry& geometry,
                              int64_t budget_bytes, int64_t max_tokens);

}  // namespace pmkv::kv
