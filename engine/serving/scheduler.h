#pragma once
// Scheduler: which sequences advance in the next step, and by how many tokens. The only caller of
// the KvCacheManager. Owned by the engine thread; no locks.
//
// A step plan (schedule()), in this order, under max_step_tokens tokens and max_running
// sequences:
//  1. running sequences that decode (one token each), oldest first;
//  2. running sequences still computing their prompt: a chunk of at most prefill_chunk tokens;
//  3. admission, first come first served from the waiting queue (the head blocks the rest):
//     guaranteed: only while the worst-case pages of every admitted sequence at its full length
//     (prompt + max_tokens) fit the pool; overcommit: while the first chunk's pages are free with
//     some pages a layer to spare for every running sequence (the new one included: 1, doubled by
//     each preemption, halved after 32 steps without one), and never in a step that preempted (a
//     preempted sequence would take back the pages it just freed).
// A chunk that does not fit the free pages shrinks. A running sequence that cannot get even one
// token is starved; then, overcommit: if demotion across sequences can free the pages, the plan
// asks build() to demote (the pages come back after the step; the starved wait one step; when
// nothing else runs, the step carries only the demotion ops: a batch of no tokens), else
// the newest running sequences are preempted (their pages freed, they go back to the front of the
// waiting queue to be recomputed) until the rest fits. Guaranteed never preempts, except when
// budgets raised at run time leave no running sequence able to step.
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/step_batch.h"
#include "engine/kv/kv_cache_manager.h"
#include "engine/runtime/step_builder.h"
#include "engine/serving/sequence.h"
#include "engine/serving/serving_engine.h"

namespace pmkv {

// Worst-case pages of one sequence of `len` tokens under `budgets` (empty: none): per layer
// min(budget pages, pages at 16 bits) plus the transient pages of one step (a decode token's
// window page and, when flushes can requantize, the body pages a flush takes before the window
// pages it empties return at end_step()); with kv_cache.hold_prompt at least the pages of its
// first `prompt_len` tokens at 16 bits (and their flush), held until the prompt's last chunk.
int64_t worst_case_pages(const kv::KvCacheConfig& config, const kv::PageGeometry& geometry,
                         std::span<const int64_t> budgets, int32_t num_layers, int64_t len,
                         int64_t prompt_len);

struct ScheduledChunk {
  Sequence* seq;
  int32_t num_tokens;  // tokens[seq->num_computed, + num_tokens) are computed this step
  bool sample;         // the chunk reaches num_tokens(): sample the next token
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;
  int32_t pressure_pages = 0;  // pages build() frees by demotion across sequences (overcommit)
  int32_t num_preempted = 0;
  // Never admitted: the request cannot fit the pool even alone (the string says why).
  std::vector<std::pair<std::unique_ptr<Sequence>, std::string>> rejected;
  int32_t num_tokens() const;
  // Nothing to run: no chunk and no demotion (a plan may demote without a chunk: its step runs
  // only the demotion ops).
  bool empty() const { return chunks.empty() && pressure_pages == 0; }
};

class Scheduler {
 public:
  Scheduler(kv::KvCacheManager& kv, SchedulerConfig config);

  // Queues a new request at the back of the waiting queue.
  void add(std::unique_ptr<Sequence> seq);
  // Removes every sequence (waiting or running) for which `pred` holds, freeing its pages.
  std::vector<std::unique_ptr<Sequence>> remove_if(
      const std::function<bool(const Sequence&)>& pred);
  // Removes every sequence, freeing its pages.
  std::vector<std::unique_ptr<Sequence>> remove_all();
  // Plans the next step (may preempt and reject; see above). A sequence whose token in flight
  // (sequence.h) is its last (prompt + max_tokens) is not planned: it ends when processed.
  StepPlan schedule();
  // Whether schedule() would find a running sequence that cannot take a token (and so demote
  // across sequences, preempt or reject): the engine then processes its steps in flight first.
  bool would_starve() const;
  // Whether any sequence, running or waiting, satisfies `pred`.
  bool any_of(const std::function<bool(const Sequence&)>& pred) const;
  // Calls `fn` on every running sequence.
  void for_each_running(const std::function<void(Sequence&)>& fn);
  // Reserves the plan's KV slots (and its pressure demotion) and builds the batch (valid until
  // the next build(): its buffers are reused from step to step). After the backend ran it (or
  // launched it: the backend runs steps in order): end_step(), then commit(plan). A token still
  // on the device (Sequence::placeholder_at) becomes a token_src row.
  const StepBatch& build(const StepPlan& plan);
  void end_step() { kv_.end_step(); }
  // Advances the counters of the plan's sequences (after end_step()); a guaranteed reservation
  // drops to the chain's worst case once a held prompt is computed.
  void commit(const StepPlan& plan);
  // Ends a running sequence: frees its pages.
  std::unique_ptr<Sequence> finish(Sequence* seq);

  // Worst-case pages of `s` at its full length (max_len): per layer min(budget pages, 16-bit
  // pages) plus the transient pages of one step, or, until its prompt is computed, its held
  // prompt if more (see README.md). Guaranteed admission reserves this; commit() lowers the
  // reservation when the prompt is done.
  int64_t worst_case_pages(const Sequence& s) const;
  // Runtime budgets (validated by the caller); reservations are recomputed.
  void set_layer_budgets(std::vector<int64_t> budgets);

  const kv::KvCacheManager& kv() const { return kv_; }
  const SchedulerConfig& config() const { return config_; }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  bool empty() const { return running_.empty() && waiting_.empty(); }
  uint64_t preemptions_total() const { return preemptions_total_; }
  int64_t reserved_pages() const { return reserved_total_; }

 private:
  bool guaranteed() const { return config_.admission == SchedulerConfig::Admission::kGuaranteed; }
  // The largest n <= want whose pages fit `free`, or 0.
  int32_t fit(const Sequence& s, int32_t want, int64_t free) const;
  // Plans the running sequences; returns the starved ones' pages (0: none starved).
  int64_t plan_running(StepPlan& plan, int32_t& budget, int64_t& free) const;
  void admit(StepPlan& plan, int32_t& budget, int64_t& free);
  void preempt_newest();
  void unreserve(Sequence& s);

  kv::KvCacheManager& kv_;
  SchedulerConfig config_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // admission order: the newest at the back
  int64_t reserved_total_ = 0;
  uint64_t preemptions_total_ = 0;
  // Overcommit's admission headroom: pages a layer kept free for each running sequence, doubled
  // by every preemption and halved after every 32 steps without one (admit()).
  static constexpr int32_t kMaxHeadroom = 64;
  int32_t headroom_ = 1;
  int32_t calm_steps_ = 0;        // steps since the last preemption or headroom change
  std::vector<SeqChunk> chunks_;  // scratch of build()
  StepBatch batch_;               // what build() returns
};

}  // namespace pmkv
