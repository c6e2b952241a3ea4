#include "engine/kv/kv_cache_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "engine/common/error.h"

namespace pmkv::kv {

namespace {

int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

}  // namespace

bool KvStepOps::empty() const {
  for (const auto& l : layers) {
    if (!l.requant.empty() || !l.demote_waves.empty()) return false;
  }
  return true;
}

int stat_index(int bits) {
  switch (bits) {
    case 16: return 0;
    case 8: return 1;
    case 4: return 2;
    case 2: return 3;
  }
  throw std::logic_error("stat_index: bits " + std::to_string(bits));
}

KvCacheManager::KvCacheManager(int32_t num_layers, PageGeometry geometry, int32_t num_pages,
                               KvCacheConfig config, std::vector<int64_t> layer_budgets)
    : num_layers_(num_layers),
      geometry_(geometry),
      config_(std::move(config)),
      page_bytes_(kv::page_bytes(geometry)),
      pool_(num_pages) {
  if (num_layers <= 0 || geometry.tokens16 <= 0 || geometry.num_kv_heads <= 0 ||
      geometry.head_dim <= 0) {
    throw std::invalid_argument("KvCacheManager: bad geometry");
  }
  config_.validate();
  if (config_.window_tokens % geometry.tokens16 != 0) {
    throw InvalidArgument("kv_cache.window_tokens (" + std::to_string(config_.window_tokens) +
                          ") must be a multiple of the tokens of a 16-bit page (" +
                          std::to_string(geometry.tokens16) + ")");
  }
  set_layer_budgets(std::move(layer_budgets));
}

void KvCacheManager::set_layer_budgets(std::vector<int64_t> budgets) {
  if (!budgets.empty() && static_cast<int32_t>(budgets.size()) != num_layers_) {
    throw InvalidArgument("KV budgets: " + std::to_string(budgets.size()) +
                          " entries for a model of " + std::to_string(num_layers_) + " layers");
  }
  for (size_t l = 0; l < budgets.size(); ++l) {
    if (budgets[l] < page_bytes_) {
      throw InvalidArgument("KV budget of layer " + std::to_string(l) + " (" +
                            std::to_string(budgets[l]) + " bytes) is smaller than one page (" +
                            std::to_string(page_bytes_) + " bytes)");
    }
  }
  budgets_ = std::move(budgets);
}

bool KvCacheManager::needs_ops() const { return !budgets_.empty() || config_.init_bits != 16; }

int32_t KvCacheManager::lower_bits(int32_t bits) const {
  const auto& ladder = config_.bit_ladder;
  const auto it = std::find(ladder.begin(), ladder.end(), bits);
  if (it == ladder.end() || it + 1 == ladder.end() || bits <= config_.floor_bits) return 0;
  return *(it + 1);
}

PageId KvCacheManager::take_page() {
  const auto p = pool_.allocate();
  if (!p) throw std::logic_error("KvCacheManager: pool exhausted after pages_needed() said it fits");
  return *p;
}

int32_t KvCacheManager::enter_bits(const Layer& L) const {
  if (config_.policy == DemotionPolicy::kBlock) return L.body_bits;
  // oldest_first: flushes enter at the newest body page's bits (the body stays ordered: older
  // pages never hold more bits than newer ones).
  return L.num_body_pages > 0 ? L.pages[L.num_sink_pages + L.num_body_pages - 1].bits
                              : config_.init_bits;
}

int32_t KvCacheManager::pages_needed(SeqId seq, int32_t n) const {
  const auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    const Layer fresh{.body_bits = config_.init_bits};
    return layer_pages_needed(fresh, n) * num_layers_;
  }
  int32_t total = 0;
  for (const Layer& L : it->second.layers) total += layer_pages_needed(L, n);
  return total;
}

int32_t KvCacheManager::layer_pages_needed(const Layer& L, int32_t n) const {
  const int32_t t16 = geometry_.tokens16;
  const int32_t sink = L.sink_tokens, window = L.window_tokens;
  const int32_t to_sink = std::min(n, config_.sink_tokens - sink);
  const int32_t rest = n - to_sink;
  const int32_t sink_pages = ceil_div(sink + to_sink, t16) - ceil_div(sink, t16);
  // Window pages the new tokens open (flushed ones are freed only at end_step), plus the body
  // pages the flushes fill (none when they enter at 16 bits: the window pages become body pages).
  const int32_t window_pages = ceil_div(window + rest, t16) - ceil_div(window, t16);
  const int32_t flushed = (window + rest) / config_.window_tokens * config_.window_tokens;
  const int32_t bits = enter_bits(L);
  const int32_t body_pages =
      (flushed == 0 || bits == 16) ? 0 : ceil_div(flushed, tokens_per_page(geometry_, bits)) + 1;
  return sink_pages + window_pages + body_pages;
}

AppendStatus KvCacheManager::append(SeqId seq, int32_t n, KvStepOps* ops,
                                    std::vector<std::vector<KvWrite>>* writes, int32_t prompt_len) {
  if (n < 0) throw std::invalid_argument("KvCacheManager::append: negative token count");
  if (!can_append(seq, n)) return AppendStatus::kPoolExhausted;
  if (ops && static_cast<int32_t>(ops->layers.size()) != num_layers_) {
    throw std::invalid_argument("KvCacheManager::append: ops must have one entry per layer");
  }
  auto [it, inserted] = seqs_.try_emplace(seq);
  Seq& s = it->second;
  if (inserted) {
    s.layers.resize(num_layers_);
    for (Layer& L : s.layers) {
      L.body_bits = config_.policy == DemotionPolicy::kBlock ? config_.init_bits : 16;
    }
  }
  const bool hold = config_.hold_prompt && s.num_tokens + n < prompt_len;
  bool within_budget = true;
  for (int32_t l = 0; l < num_layers_; ++l) {
    within_budget &= append_layer(s, s.layers[l], l, n, hold, ops ? &ops->layers[l] : nullptr,
                                  writes ? &(*writes)[l] : nullptr);
  }
  s.num_tokens += n;
  return within_budget ? AppendStatus::kOk : AppendStatus::kOverBudgetAtFloor;
}

bool KvCacheManager::append_layer(Seq& s, Layer& L, int32_t layer, int32_t n, bool hold,
                                  KvLayerOps* ops, std::vector<KvWrite>* writes) {
  const int32_t t16 = geometry_.tokens16;
  auto record = [&](const PageRef& p, int32_t take) {
    if (writes) writes->push_back({p.page, p.num_tokens, take});
  };
  int32_t left = n;
  // Sink: the first sink_tokens tokens, in pages of their own before the body.
  while (left > 0 && L.sink_tokens < config_.sink_tokens) {
    if (L.num_sink_pages == 0 || L.pages[L.num_sink_pages - 1].num_tokens == t16) {
      L.pages.insert(L.pages.begin() + L.num_sink_pages, PageRef{take_page(), 16, 0});
      ++L.num_sink_pages;
    }
    PageRef& p = L.pages[L.num_sink_pages - 1];
    const int32_t take = std::min({left, config_.sink_tokens - L.sink_tokens, t16 - p.num_tokens});
    record(p, take);
    p.num_tokens += take;
    L.sink_tokens += take;
    left -= take;
  }
  // Window: 16-bit pages at the end of the table.
  const size_t window_begin = static_cast<size_t>(L.num_sink_pages + L.num_body_pages);
  while (left > 0) {
    if (L.pages.size() == window_begin || L.pages.back().num_tokens == t16) {
      L.pages.push_back(PageRef{take_page(), 16, 0});
    }
    PageRef& p = L.pages.back();
    const int32_t take = std::min(left, t16 - p.num_tokens);
    record(p, take);
    p.num_tokens += take;
    L.window_tokens += take;
    left -= take;
  }
  if (hold) return true;  // the prompt's last chunk flushes and checks the budget
  const bool over = over_budget(L, layer);
  if (L.window_tokens < config_.window_tokens && !over) return true;
  // The table changes below; this step's attention reads it as it is now.
  L.attention_pages.assign(L.pages.begin(), L.pages.end());
  L.attention_step = step_;
  while (L.window_tokens >= config_.window_tokens) flush(L, ops);
  if (!over_budget(L, layer)) return true;
  if (config_.policy == DemotionPolicy::kBlock) return demote_block(s, L, layer, ops);
  return demote_oldest(s, L, layer, ops);
}

void KvCacheManager::flush(Layer& L, KvLayerOps* ops) {
  const int32_t t16 = geometry_.tokens16;
  const int32_t num_src = config_.window_tokens / t16;  // whole, full window pages
  const auto first = L.pages.begin() + L.num_sink_pages + L.num_body_pages;
  const int32_t bits = enter_bits(L);
  ++flushes_total_;
  L.window_tokens -= config_.window_tokens;
  const bool tail_full = L.num_body_pages == 0 || (first - 1)->bits != 16 ||
                         (first - 1)->num_tokens == t16;
  if (bits == 16 && tail_full) {
    // Entering at 16 bits: the window pages simply become body pages.
    L.num_body_pages += num_src;
    return;
  }
  if (!ops) throw std::logic_error("KvCacheManager: a flush needs ops but none were given");
  auto& group = ops->requant;
  const int32_t cap = tokens_per_page(geometry_, bits);
  std::vector<PageRef> fresh;
  fresh.reserve(static_cast<size_t>(num_src) * 2 + 1);
  PageRef* tail = nullptr;
  if (L.num_body_pages > 0 && (first - 1)->bits == bits && (first - 1)->num_tokens < cap) {
    tail = &*(first - 1);
  }
  for (int32_t i = 0; i < num_src; ++i) {
    const PageRef src = *(first + i);
    int32_t slot = 0;
    while (slot < src.num_tokens) {
      PageRef* dst = tail;
      if (!dst || dst->num_tokens == cap) {
        fresh.push_back(PageRef{take_page(), bits, 0});
        dst = tail = &fresh.back();
      }
      const int32_t count = std::min(src.num_tokens - slot, cap - dst->num_tokens);
      group.push_back(RequantOp{src.page, 16, slot, dst->page, bits, dst->num_tokens, count});
      dst->num_tokens += count;
      slot += count;
    }
    pending_free_.push_back(src.page);
  }
  // Replace the flushed window pages by the new body pages (the tail page was updated in place;
  // `fresh` may reallocate, so `tail` is not used past this point).
  const auto pos = L.pages.begin() + L.num_sink_pages + L.num_body_pages;
  L.pages.erase(pos, pos + num_src);
  L.pages.insert(L.pages.begin() + L.num_sink_pages + L.num_body_pages, fresh.begin(),
                 fresh.end());
  L.num_body_pages += static_cast<int32_t>(fresh.size());
}

bool KvCacheManager::over_budget(const Layer& L, int32_t layer) const {
  return !budgets_.empty() &&
         static_cast<int64_t>(L.pages.size()) * page_bytes_ > budgets_[layer];
}

bool KvCacheManager::demote_block(Seq& s, Layer& L, int32_t layer, KvLayerOps* ops) {
  // How many steps down the whole body must go: each step folds pairs of pages.
  const int32_t other = static_cast<int32_t>(L.pages.size()) - L.num_body_pages;
  const int64_t budget_pages = budgets_[layer] / page_bytes_;
  int32_t bits = L.body_bits, group = 1, body = L.num_body_pages;
  while (other + body > budget_pages) {
    const int32_t next = lower_bits(bits);
    if (next == 0 || body == 0) break;
    group *= bits / next;
    bits = next;
    body = ceil_div(L.num_body_pages, group);
  }
  if (bits != L.body_bits) {
    if (!ops) throw std::logic_error("KvCacheManager: a demotion needs ops but none were given");
    std::vector<DemoteOp> wave = fold_body(s, L, group, bits);
    if (ops->demote_waves.empty()) ops->demote_waves.emplace_back();
    auto& w0 = ops->demote_waves.front();
    w0.insert(w0.end(), wave.begin(), wave.end());
  }
  return !over_budget(L, layer);
}

// Block-style fold: every `group` consecutive body pages (all at body_bits) become one page at
// `bits` (the first source page, rewritten in place; the others are freed at end_step()).
std::vector<DemoteOp> KvCacheManager::fold_body(Seq& s, Layer& L, int32_t group, int32_t bits) {
  std::vector<DemoteOp> wave;
  std::vector<PageRef> body_after;
  const auto first = L.pages.begin() + L.num_sink_pages;
  for (int32_t i = 0; i < L.num_body_pages; i += group) {
    DemoteOp op;
    op.from_bits = L.body_bits;
    op.to_bits = bits;
    op.num_src = std::min(group, L.num_body_pages - i);
    int32_t tokens = 0;
    for (int32_t j = 0; j < op.num_src; ++j) {
      const PageRef& p = *(first + i + j);
      op.src[j] = p.page;
      op.tokens[j] = p.num_tokens;
      tokens += p.num_tokens;
      if (j > 0) pending_free_.push_back(p.page);
    }
    wave.push_back(op);
    body_after.push_back(PageRef{op.src[0], bits, tokens});
  }
  s.demotions += static_cast<int64_t>(wave.size());
  demotions_total_ += static_cast<int64_t>(wave.size());
  L.pages.erase(first, first + L.num_body_pages);
  L.pages.insert(L.pages.begin() + L.num_sink_pages, body_after.begin(), body_after.end());
  L.num_body_pages = static_cast<int32_t>(body_after.size());
  L.body_bits = bits;
  return wave;
}

bool KvCacheManager::demote_oldest(Seq& s, Layer& L, int32_t layer,
                                   KvLayerOps* ops) {
  // Fold the oldest pair of same-bit body pages above the floor, one pair at a time, until under
  // budget. A page made by this wave is not folded again in it (ops of a wave are independent):
  // the next pair that needs one goes into a new wave.
  std::vector<uint8_t> fresh(L.pages.size(), 0);
  std::vector<DemoteOp> wave;
  size_t wave_index = 0;
  auto emit_wave = [&] {
    if (wave.empty()) return;
    if (!ops) throw std::logic_error("KvCacheManager: a demotion needs ops but none were given");
    s.demotions += static_cast<int64_t>(wave.size());
    demotions_total_ += static_cast<int64_t>(wave.size());
    if (ops->demote_waves.size() <= wave_index) ops->demote_waves.resize(wave_index + 1);
    auto& w = ops->demote_waves[wave_index++];
    w.insert(w.end(), wave.begin(), wave.end());
    wave.clear();
    std::fill(fresh.begin(), fresh.end(), 0);
  };
  while (over_budget(L, layer)) {
    const int32_t b0 = L.num_sink_pages, b1 = L.num_sink_pages + L.num_body_pages;
    int32_t pick = -1;
    bool blocked_by_fresh = false;
    for (int32_t i = b0; i + 1 < b1; ++i) {
      const PageRef &a = L.pages[i], &b = L.pages[i + 1];
      if (a.bits != b.bits || lower_bits(a.bits) == 0) continue;
      if (fresh[i] || fresh[i + 1]) {
        blocked_by_fresh = true;
        continue;
      }
      pick = i;
      break;
    }
    if (pick < 0) {
      if (!blocked_by_fresh) break;  // nothing left to fold: at the floor
      emit_wave();
      continue;
    }
    wave.push_back(fold_pair(L, pick));
    fresh.erase(fresh.begin() + pick + 1);
    fresh[pick] = 1;
  }
  emit_wave();
  return !over_budget(L, layer);
}

// Folds body pages i and i + 1 (same bits, above the floor) into page i one ladder step down; page
// i + 1 is freed at end_step (the op reads it).
DemoteOp KvCacheManager::fold_pair(Layer& L, int32_t i) {
  const PageRef a = L.pages[i], b = L.pages[i + 1];
  DemoteOp op;
  op.from_bits = a.bits;
  op.to_bits = lower_bits(a.bits);
  op.num_src = 2;
  op.src[0] = a.page;
  op.src[1] = b.page;
  op.tokens[0] = a.num_tokens;
  op.tokens[1] = b.num_tokens;
  pending_free_.push_back(b.page);
  L.pages[i] = PageRef{a.page, op.to_bits, a.num_tokens + b.num_tokens};
  L.pages.erase(L.pages.begin() + i + 1);
  --L.num_body_pages;
  return op;
}

// Pages one pressure fold of this layer frees. block: pairs of the body (all at body_bits) when
// above the floor; oldest_first: non-overlapping adjacent same-bit body pairs above the floor.
int32_t KvCacheManager::pressure_gain(const Layer& L) const {
  if (config_.policy == DemotionPolicy::kBlock) {
    return lower_bits(L.body_bits) == 0 ? 0 : L.num_body_pages / 2;
  }
  int32_t gain = 0;
  const int32_t end = L.num_sink_pages + L.num_body_pages;
  for (int32_t i = L.num_sink_pages; i + 1 < end;) {
    const bool pair = L.pages[i].bits == L.pages[i + 1].bits && lower_bits(L.pages[i].bits) != 0;
    gain += pair ? 1 : 0;
    i += pair ? 2 : 1;
  }
  return gain;
}

// oldest_first pressure fold: each non-overlapping adjacent same-bit body pair above the floor
// becomes one page one ladder step down (16 -> 8 frees 1 page per pair).
std::vector<DemoteOp> KvCacheManager::fold_pairs(Seq& s, Layer& L) {
  std::vector<DemoteOp> wave;
  for (int32_t i = L.num_sink_pages; i + 1 < L.num_sink_pages + L.num_body_pages; ++i) {
    if (L.pages[i].bits != L.pages[i + 1].bits || lower_bits(L.pages[i].bits) == 0) continue;
    wave.push_back(fold_pair(L, i));
  }
  s.demotions += static_cast<int64_t>(wave.size());
  demotions_total_ += static_cast<int64_t>(wave.size());
  return wave;
}

int32_t KvCacheManager::pressure_demotable_pages() const {
  int32_t total = 0;
  for (const auto& [id, s] : seqs_) {
    for (const Layer& L : s.layers) total += pressure_gain(L);
  }
  return total;
}

int32_t KvCacheManager::demote_for_pressure(int32_t pages_wanted, KvStepOps* ops) {
  if (!ops || static_cast<int32_t>(ops->layers.size()) != num_layers_) {
    throw std::invalid_argument("KvCacheManager::demote_for_pressure: ops must have one entry "
                                "per layer");
  }
  // Victims: the most body pages at 16 or 8 bits first (ties: the lowest id, for determinism).
  std::vector<std::pair<int32_t, SeqId>> order;
  for (const auto& [id, s] : seqs_) {
    int32_t high = 0;
    for (const Layer& L : s.layers) {
      for (int32_t i = 0; i < L.num_body_pages; ++i) {
        high += L.pages[L.num_sink_pages + i].bits >= 8 ? 1 : 0;
      }
    }
    order.emplace_back(-high, id);
  }
  std::sort(order.begin(), order.end());
  std::vector<std::vector<DemoteOp>> waves(num_layers_);
  int32_t freed = 0;
  for (size_t v = 0; v < order.size() && freed < pages_wanted; ++v) {
    Seq& s = seqs_.at(order[v].second);
    for (int32_t l = 0; l < num_layers_ && freed < pages_wanted; ++l) {
      Layer& L = s.layers[l];
      const int32_t gain = pressure_gain(L);
      if (gain == 0) continue;
      auto wave = config_.policy == DemotionPolicy::kBlock
                      ? fold_body(s, L, 2, lower_bits(L.body_bits))
                      : fold_pairs(s, L);
      waves[l].insert(waves[l].end(), wave.begin(), wave.end());
      freed += gain;
    }
  }
  // New waves after every wave already planned this step: they may read pages those wrote.
  for (int32_t l = 0; l < num_layers_; ++l) {
    if (!waves[l].empty()) ops->layers[l].demote_waves.push_back(std::move(waves[l]));
  }
  return freed;
}

void KvCacheManager::end_step() {
  for (PageId p : pending_free_) pool_.free(p);
  pending_free_.clear();
  ++step_;
}

void KvCacheManager::release(SeqId seq) {
  const auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (const Layer& L : it->second.layers) {
    for (const PageRef& p : L.pages) pool_.free(p.page);
  }
  seqs_.erase(it);
}

int32_t KvCacheManager::num_tokens(SeqId seq) const {
  const auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.num_tokens;
}

const KvCacheManager::Seq& KvCacheManager::live_seq(SeqId seq, const char* caller) const {
  const auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    throw std::out_of_range(std::string("KvCacheManager::") + caller + ": unknown sequence " +
                            std::to_string(seq));
  }
  return it->second;
}

std::span<const PageRef> KvCacheManager::table(SeqId seq, int32_t layer) const {
  return live_seq(seq, "table").layers.at(layer).pages;
}

std::span<const PageRef> KvCacheManager::attention_table(SeqId seq, int32_t layer) const {
  const Layer& L = live_seq(seq, "attention_table").layers.at(layer);
  if (L.attention_step == step_) return L.attention_pages;
  return L.pages;
}

SeqKvStats KvCacheManager::seq_stats(SeqId seq) const {
  const Seq& s = live_seq(seq, "seq_stats");
  SeqKvStats out;
  out.demotions = s.demotions;
  for (int32_t l = 0; l < num_layers_; ++l) {
    LayerKvStats ls;
    for (const PageRef& p : s.layers[l].pages) {
      ls.tokens_by_bits[stat_index(p.bits)] += p.num_tokens;
      ls.pages_by_bits[stat_index(p.bits)] += 1;
    }
    ls.pages = static_cast<int32_t>(s.layers[l].pages.size());
    ls.bytes = ls.pages * page_bytes_;
    ls.budget_bytes = budgets_.empty() ? -1 : budgets_[l];
    out.layers.push_back(ls);
  }
  return out;
}

KvPoolStats KvCacheManager::pool_stats() const {
  KvPoolStats st;
  st.pages_total = pool_.num_pages();
  st.pages_used = pool_.num_used();
  st.pages_peak = pool_.peak_used();
  st.page_bytes = page_bytes_;
  st.layers.resize(num_layers_);
  for (int32_t l = 0; l < num_layers_; ++l) {
    st.layers[l].budget_bytes = budgets_.empty() ? -1 : budgets_[l];
  }
  for (const auto& [id, s] : seqs_) {
    for (int32_t l = 0; l < num_layers_; ++l) {
      for (const PageRef& p : s.layers[l].pages) {
        const int i = stat_index(p.bits);
        st.tokens_by_bits[i] += p.num_tokens;
        st.pages_by_bits[i] += 1;
        st.layers[l].tokens_by_bits[i] += p.num_tokens;
        st.layers[l].pages_by_bits[i] += 1;
        st.layers[l].pages += 1;
      }
    }
  }
  for (auto& ls : st.layers) ls.bytes = ls.pages * page_bytes_;
  st.demotions_total = demotions_total_;
  st.flushes_total = flushes_total_;
  st.num_sequences = static_cast<int32_t>(seqs_.size());
  return st;
}

int64_t chain_tokens_at_floor(const KvCacheConfig& config, const PageGeometry& geometry,
                              int64_t budget_bytes, int64_t max_tokens) {
  // The layer never holds more than its budget's pages after a step, plus one step's transient
  // (a window page and the body pages of one flush), so this pool never runs short.
  const int64_t budget_pages = budget_bytes / page_bytes(geometry);
  const int64_t transient = 2 + ceil_div(config.window_tokens, tokens_per_page(geometry, 2)) +
                            config.window_tokens / geometry.tokens16;
  // After a step a layer holds at most its tokens' pages at 16 bits (flushes move whole 16-bit
  // pages' worth of tokens, which never take more pages below 16 bits), so a budget of that many
  // pages for max_tokens never binds. Such budgets (an operator's "unlimited", 2^62 bytes) end
  // here: sized by them, the scratch pool would ask for ~10^14 pages.
  if (budget_pages >= pages_for_uniform(config, geometry, max_tokens, 16)) return max_tokens;
  KvCacheManager m(1, geometry, static_cast<int32_t>(budget_pages + transient), config,
                   {budget_bytes});
  KvStepOps ops;
  ops.layers.resize(1);
  for (int64_t t = 0; t < max_tokens; ++t) {
    ops.layers[0].requant.clear();
    ops.layers[0].demote_waves.clear();
    const AppendStatus st = m.append(0, 1, &ops, nullptr);
    m.end_step();
    if (st == AppendStatus::kOverBudgetAtFloor) return t;
    if (st == AppendStatus::kPoolExhausted) {
      throw std::logic_error("chain_tokens_at_floor: the scratch pool ran short");
    }
  }
  return max_tokens;
}

}  // namespace pmkv::kv
