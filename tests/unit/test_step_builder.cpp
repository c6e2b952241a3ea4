// build_step (engine/runtime/step_builder.h): a StepBatch reused from step to
// step (the scheduler's and the CUDA backend's path) holds exactly what a fresh one would, through
// prefill chunks, decode steps, flushes, demotions and a shrinking batch; a step that does not fit
// changes nothing; large page tables (copied on several threads) equal the manager's attention
// tables.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "engine/kv/kv_cache_manager.h"
#include "engine/runtime/step_builder.h"

using namespace pmkv;

namespace {

void require_same(const StepBatch& a, const StepBatch& b) {
  REQUIRE(a.token_ids == b.token_ids);
  REQUIRE(a.positions == b.positions);
  REQUIRE(a.seq_starts == b.seq_starts);
  REQUIRE(a.seq_cached == b.seq_cached);
  REQUIRE(a.page_starts == b.page_starts);
  REQUIRE(a.pages.size() == b.pages.size());
  for (size_t i = 0; i < a.pages.size(); ++i) {
    REQUIRE(a.pages[i].page == b.pages[i].page);
    REQUIRE(a.pages[i].bits == b.pages[i].bits);
    REQUIRE(a.pages[i].num_tokens == b.pages[i].num_tokens);
  }
  REQUIRE(a.write_starts == b.write_starts);
  REQUIRE(a.writes.size() == b.writes.size());
  for (size_t i = 0; i < a.writes.size(); ++i) {
    REQUIRE(a.writes[i].page == b.writes[i].page);
    REQUIRE(a.writes[i].slot == b.writes[i].slot);
    REQUIRE(a.writes[i].count == b.writes[i].count);
  }
  REQUIRE(a.kv_ops.layers.size() == b.kv_ops.layers.size());
  for (size_t l = 0; l < a.kv_ops.layers.size(); ++l) {
    const kv::KvLayerOps &x = a.kv_ops.layers[l], &y = b.kv_ops.layers[l];
    REQUIRE(x.requant.size() == y.requant.size());
    for (size_t i = 0; i < x.requant.size(); ++i) {
      REQUIRE(x.requant[i].src == y.requant[i].src);
      REQUIRE(x.requant[i].dst == y.requant[i].dst);
      REQUIRE(x.requant[i].dst_bits == y.requant[i].dst_bits);
      REQUIRE(x.requant[i].count == y.requant[i].count);
    }
    REQUIRE(x.demote_waves.size() == y.demote_waves.size());
    for (size_t w = 0; w < x.demote_waves.size(); ++w) {
      REQUIRE(x.demote_waves[w].size() == y.demote_waves[w].size());
      for (size_t i = 0; i < x.demote_waves[w].size(); ++i) {
        REQUIRE(x.demote_waves[w][i].src == y.demote_waves[w][i].src);
        REQUIRE(x.demote_waves[w][i].tokens == y.demote_waves[w][i].tokens);
        REQUIRE(x.demote_waves[w][i].to_bits == y.demote_waves[w][i].to_bits);
      }
    }
  }
  REQUIRE(a.logit_rows == b.logit_rows);
  REQUIRE(a.over_budget == b.over_budget);
}

kv::KvCacheConfig progressive() {
  kv::KvCacheConfig c;
  c.window_tokens = 8;
  c.bit_ladder = {16, 8, 4, 2};
  c.policy = kv::DemotionPolicy::kOldestFirst;
  c.uniform_bits = 4;
  c.uniform_max_len = 48;
  return c;
}

}  // namespace

TEST_CASE("step builder: a reused StepBatch holds what a fresh one holds", "[runtime][step]") {
  const kv::PageGeometry g{2, 16, 4};
  const kv::KvCacheConfig c = progressive();
  const int32_t layers = 3, pages = 2000;
  const auto budgets = kv::resolve_layer_budgets(c, layers, g);
  kv::KvCacheManager fresh_kv(layers, g, pages, c, budgets),
      reused_kv(layers, g, pages, c, budgets);
  std::mt19937 rng(11);
  std::vector<kv::SeqId> live{1, 2, 3, 4, 5};
  std::vector<std::vector<int32_t>> tokens(live.size());
  StepBatch reused;
  int64_t ops_seen = 0;
  for (int step = 0; step < 60; ++step) {
    if (step == 30) live.erase(live.begin() + 1);  // the batch shrinks: vectors keep capacity
    if (step == 45) live.erase(live.begin());
    std::vector<SeqChunk> chunks;
    for (size_t i = 0; i < live.size(); ++i) {
      // Prefill chunks of 1-9 tokens for the first steps, then decode; every logits mode.
      const int32_t n = step < 6 ? 1 + static_cast<int32_t>(rng() % 9) : 1;
      tokens[i].assign(n, static_cast<int32_t>(rng() % 100));
      const auto mode = static_cast<SeqChunk::Logits>(rng() % 3);
      chunks.push_back({live[i], tokens[i], mode});
    }
    const std::optional<StepBatch> fresh = build_step(fresh_kv, chunks);
    REQUIRE(fresh.has_value());
    REQUIRE(build_step(reused_kv, chunks, reused));
    require_same(*fresh, reused);
    for (const auto& l : reused.kv_ops.layers)
      ops_seen += static_cast<int64_t>(l.requant.size() + l.demote_waves.size());
    fresh_kv.end_step();
    reused_kv.end_step();
  }
  CHECK(ops_seen > 0);  // flushes and demotions happened on the way
}

TEST_CASE("step builder: a step that does not fit changes nothing", "[runtime][step]") {
  const kv::PageGeometry g{1, 8, 4};
  kv::KvCacheConfig c;
  c.window_tokens = 8;
  kv::KvCacheManager kv(2, g, 12, c);
  std::vector<int32_t> ids(16, 3);
  const SeqChunk ok{1, std::span(ids).first(8)};
  StepBatch b;
  REQUIRE(build_step(kv, {&ok, 1}, b));
  kv.end_step();
  const StepBatch before = b;
  const int32_t used = kv.pool().num_used();
  const SeqChunk too_big{2, ids};  // 16 tokens x 2 layers need 8 more pages than the 12 hold
  CHECK_FALSE(build_step(kv, {&too_big, 1}, b));
  CHECK(kv.pool().num_used() == used);
  CHECK(kv.num_tokens(1) == 8);
  require_same(before, b);  // untouched as well
}

TEST_CASE("step builder: large page tables (copied on several threads) equal the manager's",
          "[runtime][step]") {
  // One token per 16-bit page and long sequences: > 65,536 page references, the threaded path.
  const kv::PageGeometry g{1, 8, 1};
  kv::KvCacheConfig c;
  c.window_tokens = 8;
  const int32_t layers = 32, seqs = 40, len = 80;
  kv::KvCacheManager kv(layers, g, layers * seqs * (len + 16), c);
  std::vector<int32_t> ids(len, 1);
  std::vector<SeqChunk> chunks;
  for (int32_t s = 0; s < seqs; ++s)
    chunks.push_back({static_cast<kv::SeqId>(s + 100), std::span(ids).first(len - s)});
  StepBatch b;
  REQUIRE(build_step(kv, chunks, b));
  REQUIRE(b.pages.size() > 65536);
  size_t at = 0;
  for (int32_t l = 0; l < layers; ++l) {
    for (int32_t s = 0; s < seqs; ++s) {
      const auto t = kv.attention_table(chunks[s].seq, l);
      REQUIRE(b.page_starts[l * seqs + s] == static_cast<int32_t>(at));
      for (const kv::PageRef& p : t) {
        REQUIRE(b.pages[at].page == p.page);
        REQUIRE(b.pages[at].bits == p.bits);
        REQUIRE(b.pages[at].num_tokens == p.num_tokens);
        ++at;
      }
    }
  }
  REQUIRE(at == b.pages.size());
  kv.end_step();
}
