#include "engine/serving/scheduler.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <stdexcept>

namespace pmkv {

int64_t worst_case_pages(const kv::KvCacheConfig& c, const kv::PageGeometry& g,
                         std::span<const int64_t> budgets, int32_t num_layers, int64_t len,
                         int64_t prompt_len) {
  const int64_t p16 = kv::pages_for_uniform(c, g, len, 16);
  const int64_t page_bytes = kv::page_bytes(g);
  const bool requant = (!budgets.empty() || c.init_bits != 16) && c.bit_ladder.size() > 1;
  int64_t slack = 1;
  if (requant) {
    const int64_t cap = kv::tokens_per_page(g, c.bit_ladder[1]);
    slack += (c.window_tokens + cap - 1) / cap + 1;
  }
  // A held prompt peaks at its last chunk: every prompt token in 16-bit pages, plus the body
  // pages its flush takes when they enter below 16 bits (the window pages return at end_step).
  int64_t prompt_peak = 0;
  if (c.hold_prompt && prompt_len > 0) {
    prompt_peak = kv::pages_for_uniform(c, g, prompt_len, 16);
    if (c.init_bits != 16) {
      const int64_t flushed = prompt_len - std::min<int64_t>(prompt_len, c.sink_tokens);
      const int64_t cap = kv::tokens_per_page(g, c.init_bits);
      prompt_peak += (flushed + cap - 1) / cap + 1;
    }
  }
  int64_t total = 0;
  for (int32_t l = 0; l < num_layers; ++l) {
    const int64_t held = budgets.empty() ? p16 : std::min(budgets[l] / page_bytes, p16);
    total += std::max(held + slack, prompt_peak);
  }
  return total;
}

int32_t StepPlan::num_tokens() const {
  int32_t n = 0;
  for (const ScheduledChunk& c : chunks)
    n += c.num_tokens;
  return n;
}

Scheduler::Scheduler(kv::KvCacheManager& kv, SchedulerConfig config) : kv_(kv), config_(config) {}

void Scheduler::add(std::unique_ptr<Sequence> seq) {
  waiting_.push_back(std::move(seq));
}

std::vector<std::unique_ptr<Sequence>> Scheduler::remove_if(
    const std::function<bool(const Sequence&)>& pred) {
  std::vector<std::unique_ptr<Sequence>> out;
  for (auto it = running_.begin(); it != running_.end();) {
    if (!pred(**it)) {
      ++it;
      continue;
    }
    kv_.release((*it)->id);
    unreserve(**it);
    out.push_back(std::move(*it));
    it = running_.erase(it);
  }
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if (!pred(**it)) {
      ++it;
      continue;
    }
    out.push_back(std::move(*it));  // waiting sequences hold no pages
    it = waiting_.erase(it);
  }
  return out;
}

std::vector<std::unique_ptr<Sequence>> Scheduler::remove_all() {
  return remove_if([](const Sequence&) { return true; });
}

int32_t Scheduler::fit(const Sequence& s, int32_t want, int64_t free) const {
  if (want <= 0) return 0;
  if (kv_.pages_needed(s.id, want) <= free) return want;
  // pages_needed grows with n: the largest n that fits, by bisection (0 always fits).
  int32_t lo = 0, hi = want;
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;
    (kv_.pages_needed(s.id, mid) <= free ? lo : hi) = mid;
  }
  return lo;
}

int64_t Scheduler::plan_running(StepPlan& plan, int32_t& budget, int64_t& free) const {
  int64_t starved = 0;
  for (const bool decode_pass : {true, false}) {
    for (const auto& s : running_) {
      // A token in flight that is the last allowed ends the sequence when processed.
      if (s->num_tokens() >= s->max_len()) continue;
      const int32_t remaining = s->num_tokens() - s->num_computed;
      if ((remaining == 1) != decode_pass) continue;
      if (budget == 0) break;
      const int32_t n = fit(*s, std::min({remaining, config_.prefill_chunk, budget}), free);
      if (n == 0) {
        starved += kv_.pages_needed(s->id, 1);
        continue;
      }
      free -= kv_.pages_needed(s->id, n);
      budget -= n;
      plan.chunks.push_back({s.get(), n, s->num_computed + n == s->num_tokens()});
    }
  }
  return starved;
}

void Scheduler::admit(StepPlan& plan, int32_t& budget, int64_t& free) {
  const int64_t pool = kv_.pool().num_pages();
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < config_.max_running) {
    Sequence& s = *waiting_.front();
    const int64_t worst = worst_case_pages(s);
    if (worst > pool) {
      plan.rejected.emplace_back(
          std::move(waiting_.front()),
          "the request needs " + std::to_string(worst) + " KV pages at its full length of " +
              std::to_string(s.max_len()) + " tokens (prompt + max_tokens); the pool has " +
              std::to_string(pool) + " (kv_cache.memory)");
      waiting_.pop_front();
      continue;
    }
    if (guaranteed() && reserved_total_ + worst > pool) break;
    // Overcommit keeps headroom_ pages a layer free for each running sequence (this one
    // included): room for their next pages. Without it a preempted sequence came straight back
    // into the pages it had just freed and was preempted again at the next shortage, over and
    // over; with a fixed page a layer, a pool that keeps running short still preempted ~4x more
    // (bench/RESULTS.md, "Serving load").
    const int64_t reserve =
        guaranteed() ? 0 : static_cast<int64_t>(running_.size() + 1) * kv_.num_layers() * headroom_;
    const int32_t remaining = s.num_tokens() - s.num_computed;
    const int32_t n = fit(s, std::min({remaining, config_.prefill_chunk, budget}), free - reserve);
    if (n == 0) break;
    free -= kv_.pages_needed(s.id, n);
    budget -= n;
    if (guaranteed()) {
      s.reserved_pages = worst;
      reserved_total_ += worst;
    }
    plan.chunks.push_back({&s, n, s.num_computed + n == s.num_tokens()});
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

StepPlan Scheduler::schedule() {
  StepPlan plan;
  // Overcommit's headroom: doubled by each preemption (below), halved after every 32 steps
  // without one, between 1 and kMaxHeadroom pages a layer per running sequence.
  if (++calm_steps_ >= 32) {
    headroom_ = std::max(1, headroom_ / 2);
    calm_steps_ = 0;
  }
  for (;;) {
    plan.chunks.clear();
    int32_t budget = config_.max_step_tokens;
    int64_t free = kv_.pool().num_free();
    const int64_t starved = plan_running(plan, budget, free);
    if (starved == 0) {
      // Nothing is admitted in a step that preempted (as vLLM's scheduler): the pages just freed
      // are for the sequences that ran short, not for the waiting queue.
      if (plan.num_preempted == 0) admit(plan, budget, free);
      return plan;
    }
    // Some running sequence cannot take even one token this step.
    if (guaranteed() && !plan.chunks.empty()) return plan;  // the others free pages for it
    if (!guaranteed() && kv_.pressure_demotable_pages() >= starved - free) {
      // Demote now, run the starved next step (a step of demotion ops only when none fits now).
      plan.pressure_pages = static_cast<int32_t>(starved - free);
      return plan;
    }
    if (running_.size() == 1) {
      // Alone and still not fitting: it can never run (only when budgets changed at run time).
      auto s = finish(running_.front().get());
      plan.rejected.emplace_back(std::move(s), "the request no longer fits the KV pool");
      return plan;
    }
    if (guaranteed()) {
      spdlog::warn(
          "scheduler: no running sequence fits the KV pool (budgets raised at run time?); "
          "preempting the newest");
    }
    preempt_newest();
    ++plan.num_preempted;
    headroom_ = std::min(headroom_ * 2, kMaxHeadroom);
    calm_steps_ = 0;
  }
}

bool Scheduler::would_starve() const {
  StepPlan plan;
  int32_t budget = config_.max_step_tokens;
  int64_t free = kv_.pool().num_free();
  return plan_running(plan, budget, free) > 0;
}

bool Scheduler::any_of(const std::function<bool(const Sequence&)>& pred) const {
  for (const auto& s : running_) {
    if (pred(*s)) return true;
  }
  for (const auto& s : waiting_) {
    if (pred(*s)) return true;
  }
  return false;
}

void Scheduler::for_each_running(const std::function<void(Sequence&)>& fn) {
  for (const auto& s : running_)
    fn(*s);
}

void Scheduler::preempt_newest() {
  std::unique_ptr<Sequence> s = std::move(running_.back());
  running_.pop_back();
  kv_.release(s->id);
  unreserve(*s);
  spdlog::debug("scheduler: preempting request {} ({} tokens) for recompute", s->request.request_id,
                s->num_tokens());
  s->num_computed = 0;
  ++s->num_preemptions;
  ++preemptions_total_;
  waiting_.push_front(std::move(s));
}

const StepBatch& Scheduler::build(const StepPlan& plan) {
  chunks_.clear();
  for (const ScheduledChunk& c : plan.chunks) {
    chunks_.push_back({c.seq->id,
                       std::span(c.seq->tokens).subspan(c.seq->num_computed, c.num_tokens),
                       c.sample ? SeqChunk::Logits::kLast : SeqChunk::Logits::kNone,
                       c.seq->num_prompt});
  }
  if (!build_step(kv_, chunks_, batch_)) {
    throw std::logic_error("Scheduler: the planned step does not fit the KV pool");
  }
  // Tokens the previous step sampled that the host has not seen yet (steps run ahead).
  for (size_t k = 0; k < plan.chunks.size(); ++k) {
    const Sequence& s = *plan.chunks[k].seq;
    const int32_t at = s.placeholder_at - s.num_computed;
    if (s.placeholder_at < 0 || at < 0 || at >= plan.chunks[k].num_tokens) continue;
    if (batch_.token_src.empty()) batch_.token_src.assign(batch_.token_ids.size(), -1);
    batch_.token_src[batch_.seq_starts[k] + at] = s.placeholder_row;
  }
  if (plan.pressure_pages > 0) {
    const int32_t freed = kv_.demote_for_pressure(plan.pressure_pages, &batch_.kv_ops);
    // The batch keeps the tables it has: the demotion runs after the step's forward.
    spdlog::debug("scheduler: KV pool pressure: demoting frees {} of {} pages wanted", freed,
                  plan.pressure_pages);
  }
  return batch_;
}

void Scheduler::commit(const StepPlan& plan) {
  for (const ScheduledChunk& c : plan.chunks) {
    Sequence& s = *c.seq;
    const bool prompt_done = s.num_computed < s.num_prompt &&
                             s.num_computed + c.num_tokens >= s.num_prompt;
    s.num_computed += c.num_tokens;
    // A held prompt's 16-bit pages went back at this step's end_step(): from here on the
    // sequence needs what its chain needs, and guaranteed admission may give the rest away.
    if (prompt_done && guaranteed() && s.reserved_pages > 0) {
      const int64_t now = worst_case_pages(s);
      reserved_total_ -= s.reserved_pages - now;
      s.reserved_pages = now;
    }
  }
}

std::unique_ptr<Sequence> Scheduler::finish(Sequence* seq) {
  const auto it =
      std::find_if(running_.begin(), running_.end(), [&](const auto& s) { return s.get() == seq; });
  if (it == running_.end()) throw std::logic_error("Scheduler::finish: not a running sequence");
  std::unique_ptr<Sequence> s = std::move(*it);
  running_.erase(it);
  kv_.release(s->id);
  unreserve(*s);
  return s;
}

int64_t Scheduler::worst_case_pages(const Sequence& s) const {
  // The held prompt counts until it is computed (a recompute after preemption holds it again).
  const int32_t held = s.num_computed < s.num_prompt ? s.num_prompt : 0;
  return pmkv::worst_case_pages(kv_.config(), kv_.geometry(), kv_.layer_budgets(), kv_.num_layers(),
                                s.max_len(), held);
}

void Scheduler::set_layer_budgets(std::vector<int64_t> budgets) {
  kv_.set_layer_budgets(std::move(budgets));
  if (!guaranteed()) return;
  reserved_total_ = 0;
  for (const auto& s : running_) {
    s->reserved_pages = worst_case_pages(*s);
    reserved_total_ += s->reserved_pages;
  }
}

void Scheduler::unreserve(Sequence& s) {
  reserved_total_ -= s.reserved_pages;
  s.reserved_pages = 0;
}

}  // namespace pmkv
