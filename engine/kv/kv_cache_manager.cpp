#include "engine/kv/kv_cache_manager.h"

#include <stdexcept>
#include <string>

namespace pmkv::kv {

namespace {
constexpr int kBits = 16;
}

KvCacheManager::KvCacheManager(int32_t num_layers, PageGeometry geometry, int32_t num_pages)
    : num_layers_(num_layers), geometry_(geometry), pool_(num_pages) {
  if (num_layers <= 0 || geometry.tokens16 <= 0 || geometry.num_kv_heads <= 0 ||
      geometry.head_dim <= 0) {
    throw std::invalid_argument("KvCacheManager: bad geometry");
  }
}

int32_t KvCacheManager::pages_needed(SeqId seq, int32_t n) const {
  const int32_t per_page = tokens_per_page(geometry_, kBits);
  const auto it = seqs_.find(seq);
  const int32_t have = it == seqs_.end() ? 0 : it->second.num_tokens;
  const int32_t pages_now = (have + per_page - 1) / per_page;
  const int32_t pages_after = (have + n + per_page - 1) / per_page;
  return (pages_after - pages_now) * num_layers_;
}

bool KvCacheManager::append(SeqId seq, int32_t n) {
  if (n < 0) throw std::invalid_argument("KvCacheManager::append: negative token count");
  if (!can_append(seq, n)) return false;
  auto [it, inserted] = seqs_.try_emplace(seq);
  SeqState& s = it->second;
  if (inserted) s.layers.resize(num_layers_);
  const int32_t per_page = tokens_per_page(geometry_, kBits);
  for (auto& pages : s.layers) {
    int32_t left = n;
    while (left > 0) {
      if (pages.empty() || pages.back().num_tokens == per_page) {
        // can_append() counted this page, so the pool has it.
        pages.push_back(PageRef{*pool_.allocate(), kBits, 0});
      }
      const int32_t take = std::min(left, per_page - pages.back().num_tokens);
      pages.back().num_tokens += take;
      left -= take;
    }
  }
  s.num_tokens += n;
  return true;
}

void KvCacheManager::release(SeqId seq) {
  const auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (const auto& pages : it->second.layers) {
    for (const PageRef& p : pages)
      pool_.free(p.page);
  }
  seqs_.erase(it);
}

int32_t KvCacheManager::num_tokens(SeqId seq) const {
  const auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.num_tokens;
}

std::span<const PageRef> KvCacheManager::table(SeqId seq, int32_t layer) const {
  const auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    throw std::out_of_range("KvCacheManager::table: unknown sequence " + std::to_string(seq));
  }
  return it->second.layers.at(layer);
}

}  // namespace pmkv::kv
