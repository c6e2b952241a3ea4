// KvCacheManager: page tables, window flushes, budgets and demotion policies. Property tests run
// random workloads and check the invariants of engine/kv/kv_cache_manager.h after every step; a
// byte-level test runs the planned ops on a real pool and checks every token's values.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>

#include "engine/backend/cpu/kv_page_ops.h"
#include "engine/backend/cpu/paged_attention.h"
#include "engine/kv/kv_cache_manager.h"

using namespace pmkv;
using namespace pmkv::kv;

namespace {

KvStepOps ops_for(const KvCacheManager& m) {
  KvStepOps ops;
  ops.layers.resize(m.num_layers());
  return ops;
}

std::vector<std::vector<KvWrite>> writes_for(const KvCacheManager& m) {
  return std::vector<std::vector<KvWrite>>(m.num_layers());
}

AppendStatus append(KvCacheManager& m, SeqId s, int32_t n) {
  auto ops = ops_for(m);
  auto w = writes_for(m);
  const AppendStatus st = m.append(s, n, &ops, &w);
  m.end_step();
  return st;
}

// bits of every token of a table, in order
std::vector<int> token_bits(std::span<const PageRef> table) {
  std::vector<int> out;
  for (const PageRef& p : table)
    out.insert(out.end(), p.num_tokens, p.bits);
  return out;
}

int32_t live_pages(const KvCacheManager& m, const std::map<SeqId, int32_t>& live) {
  int32_t n = 0;
  for (const auto& [id, tokens] : live) {
    for (int32_t l = 0; l < m.num_layers(); ++l)
      n += static_cast<int32_t>(m.table(id, l).size());
  }
  return n;
}

}  // namespace

TEST_CASE("kv config: auto pages hold 32 tokens at 16 bits, 16 where the window needs it",
          "[kv][config]") {
  KvCacheConfig c;  // page_bytes auto, window 128
  REQUIRE(resolve_geometry(c, 8, 128).tokens16 == 32);
  REQUIRE(page_bytes(resolve_geometry(c, 8, 128)) == 2 * page_bytes(PageGeometry{8, 128, 16}));
  c.window_tokens = 48;  // a multiple of 16, not of 32: the earlier default
  REQUIRE(resolve_geometry(c, 8, 128).tokens16 == 16);
  c.window_tokens = 20;  // neither: 16, which the manager rejects naming the key
  REQUIRE(resolve_geometry(c, 8, 128).tokens16 == 16);
  REQUIRE_THROWS_WITH(KvCacheManager(1, resolve_geometry(c, 8, 128), 8, c),
                      Catch::Contains("kv_cache.window_tokens"));
  c.window_tokens = 128;
  c.page_bytes = page_bytes(PageGeometry{8, 128, 20}) + 100;  // explicit: the largest that fits
  REQUIRE(resolve_geometry(c, 8, 128).tokens16 == 20);
}

TEST_CASE("kv manager: sink, window and 16-bit body; flushes relabel pages", "[kv][manager]") {
  KvCacheConfig c;
  c.sink_tokens = 1;
  c.window_tokens = 8;
  KvCacheManager m(2, PageGeometry{2, 16, 4}, 100, c);
  CHECK_FALSE(m.needs_ops());
  auto w = writes_for(m);
  REQUIRE(m.append(1, 11, nullptr, &w) == AppendStatus::kOk);
  // 1 sink token; 10 more: 8 flushed to the body (2 pages), 2 left in the window.
  for (int32_t l = 0; l < 2; ++l) {
    const auto t = m.table(1, l);
    REQUIRE(t.size() == 4);
    CHECK(t[0].num_tokens == 1);
    CHECK(t[1].num_tokens == 4);
    CHECK(t[2].num_tokens == 4);
    CHECK(t[3].num_tokens == 2);
    // the writes cover the 11 new tokens in order: sink slot 0, then window pages
    int32_t sum = 0;
    for (const KvWrite& x : w[l])
      sum += x.count;
    CHECK(sum == 11);
    CHECK(w[l][0].page == t[0].page);
  }
  m.end_step();
  CHECK(m.pool().num_used() == 8);
  m.release(1);
  CHECK(m.pool().num_used() == 0);
}

TEST_CASE("kv manager: a failed append changes nothing", "[kv][manager]") {
  KvCacheConfig c;
  c.window_tokens = 4;
  KvCacheManager m(2, PageGeometry{1, 8, 4}, 6, c);
  REQUIRE(append(m, 7, 5) == AppendStatus::kOk);  // sink page + 1 body page per layer
  const int32_t used = m.pool().num_used();
  CHECK(append(m, 8, 9) == AppendStatus::kPoolExhausted);
  CHECK_FALSE(m.contains(8));
  CHECK(m.pool().num_used() == used);
  CHECK(m.num_tokens(7) == 5);
}

TEST_CASE("kv manager: block policy demotes the whole body, flushes enter at its bits",
          "[kv][manager]") {
  KvCacheConfig c;
  c.sink_tokens = 1;
  c.window_tokens = 4;
  const PageGeometry g{1, 16, 4};  // 16-bit pages hold 4 tokens, 2-bit pages 32
  KvCacheManager m(1, g, 200, c, {6 * page_bytes(g)});
  REQUIRE(append(m, 1, 1 + 16) == AppendStatus::kOk);  // sink + 4 body pages + empty window
  CHECK(m.table(1, 0).size() == 5);
  // 4 more: a 5th body page, 6 pages: still within budget
  REQUIRE(append(m, 1, 4) == AppendStatus::kOk);
  CHECK(m.table(1, 0).size() == 6);
  // one more token opens a window page: 7 pages > 6 -> body 16 -> 8 bits (5 pages -> 3)
  auto ops = ops_for(m);
  auto w = writes_for(m);
  REQUIRE(m.append(1, 1, &ops, &w) == AppendStatus::kOk);
  REQUIRE(ops.layers[0].demote_waves.size() == 1);
  CHECK(ops.layers[0].demote_waves[0].size() == 3);
  m.end_step();
  auto t = m.table(1, 0);
  CHECK(token_bits(t) ==
        std::vector<int>{16, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 16});
  CHECK(t.size() == 5);
  // the next flush enters at 8 bits, into the partly filled tail page
  ops = ops_for(m);
  w = writes_for(m);
  REQUIRE(m.append(1, 3, &ops, &w) == AppendStatus::kOk);
  REQUIRE(ops.layers[0].requant.size() == 1);
  CHECK(ops.layers[0].requant[0].dst_bits == 8);
  CHECK(ops.layers[0].requant[0].count == 4);
  m.end_step();
  CHECK(m.seq_stats(1).demotions == 3);
}

TEST_CASE("kv manager: at the floor and still over budget is reported", "[kv][manager]") {
  KvCacheConfig c;
  c.sink_tokens = 1;
  c.window_tokens = 4;
  c.floor_bits = 4;
  const PageGeometry g{1, 16, 4};
  KvCacheManager m(1, g, 400, c, {3 * page_bytes(g)});
  AppendStatus st = AppendStatus::kOk;
  int32_t steps = 0;
  while (st == AppendStatus::kOk && steps < 200) {
    st = append(m, 1, 1);
    ++steps;
  }
  CHECK(st == AppendStatus::kOverBudgetAtFloor);
  // sink page + body at 4 bits (16 tokens/page) + window: more than 3 pages only once the body
  // needs a 2nd 4-bit page: 1 + 16 + ... tokens
  for (int b : token_bits(m.table(1, 0)))
    CHECK(b >= 4);
  m.release(1);
  CHECK(m.pool().num_used() == 0);
}

TEST_CASE("kv manager: chain_tokens_at_floor is where the floor action ends a chain",
          "[kv][manager]") {
  KvCacheConfig c;
  c.window_tokens = 32;
  const PageGeometry g{2, 16, 32};  // 16-bit pages of 32 tokens, 2-bit pages of 256
  const int64_t pb = page_bytes(g);
  // Two pages: the sink's (1 token) and one window page (32 tokens); the 34th token needs a third.
  CHECK(chain_tokens_at_floor(c, g, 2 * pb, 4096) == 33);
  CHECK(chain_tokens_at_floor(c, g, 1000 * pb, 4096) == 4096);
  // Budgets beyond a full chain's 16-bit pages never bind (the property test checks the bound);
  // INT64_MAX and 2^62 bytes once sized a scratch pool by their pages (an exception; gigabytes).
  CHECK(chain_tokens_at_floor(c, g, std::numeric_limits<int64_t>::max(), 1 << 20) == 1 << 20);
  CHECK(chain_tokens_at_floor(c, g, int64_t{1} << 62, 4096) == 4096);
  // The same count as a manager appending one token at a time until the floor action, for both
  // policies and a few floors and budgets.
  for (DemotionPolicy policy : {DemotionPolicy::kBlock, DemotionPolicy::kOldestFirst}) {
    for (int floor : {16, 4, 2}) {
      for (int64_t pages : {3, 5, 9, 17}) {
        c.policy = policy;
        c.floor_bits = floor;
        KvCacheManager m(1, g, 400, c, {pages * pb});
        int64_t held = 0;
        for (; held < 4096; ++held) {
          KvStepOps ops;
          ops.layers.resize(1);
          const AppendStatus st = m.append(1, 1, &ops, nullptr);
          m.end_step();
          if (st == AppendStatus::kOverBudgetAtFloor) break;
        }
        INFO("policy " << static_cast<int>(policy) << " floor " << floor << " pages " << pages);
        CHECK(chain_tokens_at_floor(c, g, pages * pb, 4096) == held);
        CHECK(held < 4096);
      }
    }
  }
  // engine/kv/README.md's example: uniform 2-bit at 256 tokens, a 128-token window: 6 pages
  // (sink, 4 window pages, one 2-bit body page), and chains end at 481 tokens, not 256.
  c.window_tokens = 128;
  c.floor_bits = 2;
  c.policy = DemotionPolicy::kBlock;
  REQUIRE(pages_for_uniform(c, g, 256, 2) == 6);
  CHECK(chain_tokens_at_floor(c, g, 6 * pb, 4096) == 481);
  // A budget "equal to uniform b-bit memory at L tokens" lets a chain reach L (L a multiple of
  // the window, so that the window is at its fullest there) whatever the ladder walks through.
  for (int bits : {16, 8, 4, 2}) {
    for (int64_t len : {256, 1024, 4096}) {
      INFO("uniform " << bits << " bits at " << len << " tokens");
      const int64_t budget = pages_for_uniform(c, g, len, bits) * pb;
      CHECK(chain_tokens_at_floor(c, g, budget, 1 << 20) >= len);
    }
  }
}

namespace {

// A table's shape: (bits, tokens) of every page, in order (page ids left out).
std::vector<std::pair<int, int>> shape(std::span<const PageRef> table) {
  std::vector<std::pair<int, int>> out;
  for (const PageRef& p : table)
    out.emplace_back(p.bits, p.num_tokens);
  return out;
}

// One sequence: a prompt of `prompt` tokens appended in `chunks` (sizes summing to it), then
// `decode` single tokens. Per step: every layer's table shape and the step's op counts.
struct Trace {
  std::vector<std::vector<std::vector<std::pair<int, int>>>> tables;  // [step][layer]
  std::vector<std::vector<std::pair<size_t, size_t>>> ops;            // [step][layer]
  std::vector<AppendStatus> status;
  int prompt_reads_below_16 = 0;  // prompt chunks whose attention read a token below 16 bits
};

Trace run_chunked(const KvCacheConfig& c, const PageGeometry& g, int32_t layers,
                  const std::vector<int64_t>& budgets, int32_t prompt,
                  const std::vector<int32_t>& chunks, int32_t decode) {
  KvCacheManager m(layers, g, 4000, c, budgets);
  Trace t;
  std::vector<int32_t> sizes = chunks;
  sizes.insert(sizes.end(), decode, 1);
  int32_t held = 0;
  for (const int32_t n : sizes) {
    auto ops = ops_for(m);
    auto w = writes_for(m);
    const AppendStatus st = m.append(1, n, &ops, &w, prompt);
    if (held < prompt) {
      const auto read = token_bits(m.attention_table(1, 0));
      t.prompt_reads_below_16 += std::any_of(read.begin(), read.end(), [](int b) { return b < 16; });
    }
    held += n;
    m.end_step();
    if (held < prompt && c.hold_prompt) {
      // Still the prompt: nothing flushed, nothing demoted, every token at 16 bits.
      REQUIRE(st == AppendStatus::kOk);
      for (int32_t l = 0; l < layers; ++l) {
        REQUIRE(ops.layers[l].requant.empty());
        REQUIRE(ops.layers[l].demote_waves.empty());
        for (int b : token_bits(m.table(1, l)))
          REQUIRE(b == 16);
      }
      continue;
    }
    if (held < prompt) continue;
    t.status.push_back(st);
    auto& step_tables = t.tables.emplace_back();
    auto& step_ops = t.ops.emplace_back();
    for (int32_t l = 0; l < layers; ++l) {
      step_tables.push_back(shape(m.table(1, l)));
      size_t demotes = 0;
      for (const auto& wave : ops.layers[l].demote_waves)
        demotes += wave.size();
      step_ops.emplace_back(ops.layers[l].requant.size(), demotes);
    }
    if (st == AppendStatus::kOverBudgetAtFloor) break;
  }
  m.release(1);
  REQUIRE(m.pool().num_used() == 0);
  return t;
}

}  // namespace

TEST_CASE("kv manager: a held prompt's tables and ops do not depend on its chunking",
          "[kv][manager][property]") {
  // The scheduler cuts a prompt into chunks by what else runs in the step. With hold_prompt the
  // cache after the prompt (and every step after it) is the one a single append of the whole
  // prompt gives, and no chunk reads the prompt below 16 bits; without it the chunking moves
  // flushes and demotions (the last check, on these same workloads).
  const auto policy = GENERATE(DemotionPolicy::kBlock, DemotionPolicy::kOldestFirst);
  std::mt19937 rng(policy == DemotionPolicy::kBlock ? 31 : 32);
  const PageGeometry g{2, 16, 4};
  int differ_without_hold = 0;
  for (int trial = 0; trial < 40; ++trial) {
    KvCacheConfig c;
    c.policy = policy;
    c.sink_tokens = static_cast<int32_t>(rng() % 3);
    c.window_tokens = 4 * (1 + static_cast<int32_t>(rng() % 3));
    c.floor_bits = (rng() % 2) ? 2 : 4;
    c.init_bits = (rng() % 4) ? 16 : 8;
    const int32_t layers = 2;
    std::vector<int64_t> budgets;
    for (int32_t l = 0; l < layers; ++l)
      budgets.push_back((4 + rng() % 10) * page_bytes(g));
    const int32_t prompt = 1 + static_cast<int32_t>(rng() % 120);
    std::vector<int32_t> chunks;
    for (int32_t left = prompt; left > 0;) {
      const int32_t n = std::min(left, 1 + static_cast<int32_t>(rng() % 24));
      chunks.push_back(n);
      left -= n;
    }
    INFO("trial " << trial << ": prompt " << prompt << " in " << chunks.size() << " chunks");
    const Trace whole = run_chunked(c, g, layers, budgets, prompt, {prompt}, 60);
    const Trace chunked = run_chunked(c, g, layers, budgets, prompt, chunks, 60);
    REQUIRE(chunked.tables == whole.tables);
    REQUIRE(chunked.ops == whole.ops);
    REQUIRE(chunked.status == whole.status);
    // Every prompt chunk attends to the prompt at 16 bits, as the single append does.
    REQUIRE(chunked.prompt_reads_below_16 == 0);
    c.hold_prompt = false;
    const Trace unheld = run_chunked(c, g, layers, budgets, prompt, chunks, 60);
    differ_without_hold += unheld.tables != whole.tables || unheld.prompt_reads_below_16 > 0;
  }
  CHECK(differ_without_hold > 0);
}

TEST_CASE("kv manager: attention_table is the table before the step's flushes and demotions",
          "[kv][manager]") {
  KvCacheConfig c;
  c.window_tokens = 8;
  c.sink_tokens = 1;
  const PageGeometry g{2, 16, 4};
  KvCacheManager m(1, g, 64, c, {4 * page_bytes(g)});
  std::vector<std::pair<int, int>> before = {};
  int changed = 0;
  for (int step = 0; step < 40; ++step) {
    auto ops = ops_for(m);
    auto w = writes_for(m);
    REQUIRE(m.append(1, 1, &ops, &w) == AppendStatus::kOk);
    // The previous table plus this step's token (in the last window page, at 16 bits).
    auto expect = before;
    if (expect.empty() || expect.back().first != 16 || expect.back().second == g.tokens16 ||
        (step == 1 && c.sink_tokens == 1)) {
      expect.emplace_back(16, 1);
    } else {
      ++expect.back().second;
    }
    INFO("step " << step);
    CHECK(shape(m.attention_table(1, 0)) == expect);
    const bool planned = !ops.layers[0].requant.empty() || !ops.layers[0].demote_waves.empty();
    changed += shape(m.table(1, 0)) != expect;
    if (!planned) CHECK(shape(m.table(1, 0)) == shape(m.attention_table(1, 0)));
    m.end_step();
    CHECK(shape(m.attention_table(1, 0)) == shape(m.table(1, 0)));
    before = shape(m.table(1, 0));
  }
  CHECK(changed > 0);
}

TEST_CASE("kv manager: property test over random workloads, budgets and policies",
          "[kv][manager][property]") {
  const auto policy = GENERATE(DemotionPolicy::kBlock, DemotionPolicy::kOldestFirst);
  const uint32_t seed = GENERATE(1u, 2u, 3u, 4u);
  std::mt19937 rng(seed * 7919 + static_cast<uint32_t>(policy));
  KvCacheConfig c;
  c.policy = policy;
  c.sink_tokens = 1 + static_cast<int32_t>(rng() % 3);
  c.window_tokens = 4 * (1 + static_cast<int32_t>(rng() % 3));
  c.floor_bits = (rng() % 2) ? 2 : 4;
  c.init_bits = (rng() % 4) ? 16 : 8;
  const PageGeometry g{2, 16, 4};
  const int32_t layers = 3;
  std::vector<int64_t> budgets;
  for (int32_t l = 0; l < layers; ++l)
    budgets.push_back((5 + rng() % 8) * page_bytes(g));
  KvCacheManager m(layers, g, 600, c, budgets);
  std::map<SeqId, int32_t> live;
  std::map<SeqId, int32_t> prompt_of;  // held prompts (hold_prompt), in random chunks
  std::map<std::pair<SeqId, int32_t>, std::vector<int>> prev_bits;
  SeqId next_id = 0;
  int over_budget_events = 0, demotions_seen = 0;
  for (int step = 0; step < 400; ++step) {
    // admit, grow (prefill chunks or decode tokens), or finish sequences
    if (live.size() < 4 && rng() % 4 == 0) {
      prompt_of[next_id] = 1 + static_cast<int32_t>(rng() % 60);
      live[next_id++] = 0;
    }
    auto ops = ops_for(m);
    auto w = writes_for(m);
    std::vector<SeqId> finished;
    for (auto& [id, n] : live) {
      const int32_t prompt = prompt_of[id];
      const int32_t add =
          n < prompt ? std::min(prompt - n, 1 + static_cast<int32_t>(rng() % 20)) : 1;
      const AppendStatus st = m.append(id, add, &ops, &w, prompt);
      if (st == AppendStatus::kPoolExhausted) continue;
      n += add;
      if (st == AppendStatus::kOverBudgetAtFloor) {
        ++over_budget_events;
        finished.push_back(id);
      } else if (rng() % 60 == 0) {
        finished.push_back(id);
      }
    }
    for (const auto& l : ops.layers) {
      for (const auto& wave : l.demote_waves)
        demotions_seen += static_cast<int>(wave.size());
    }
    m.end_step();
    for (SeqId id : finished) {
      m.release(id);
      live.erase(id);
      for (int32_t l = 0; l < layers; ++l)
        prev_bits.erase({id, l});
    }
    // invariants
    REQUIRE(m.pool().num_used() == live_pages(m, live));
    for (const auto& [id, n] : live) {
      REQUIRE(m.num_tokens(id) == n);
      for (int32_t l = 0; l < layers; ++l) {
        const auto t = m.table(id, l);
        INFO("step " << step << " seq " << id << " layer " << l);
        const auto bits = token_bits(t);
        REQUIRE(static_cast<int32_t>(bits.size()) == n);
        // Never more pages than the tokens take at 16 bits (chain_tokens_at_floor's bound).
        REQUIRE(static_cast<int64_t>(t.size()) <= pages_for_uniform(c, g, n, 16));
        if (n < prompt_of[id]) {
          // A held prompt: every token at 16 bits, the budget not applied yet.
          for (int b : bits)
            REQUIRE(b == 16);
          prev_bits[{id, l}] = bits;
          continue;
        }
        REQUIRE(static_cast<int64_t>(t.size()) * m.page_bytes() <= budgets[l]);
        for (int32_t i = 0; i < std::min(n, c.sink_tokens); ++i)
          REQUIRE(bits[i] == 16);
        // the window (tokens after the last flush) is at 16 bits
        const int32_t rest = std::max(0, n - c.sink_tokens);
        for (int32_t i = n - rest % c.window_tokens; i < n; ++i)
          REQUIRE(bits[i] == 16);
        for (int b : bits)
          REQUIRE(b >= c.floor_bits);
        if (policy == DemotionPolicy::kOldestFirst) {
          // oldest_first keeps the body ordered: older tokens never hold more bits than newer
          const int32_t body_end = n - rest % c.window_tokens;
          for (int32_t i = std::min(n, c.sink_tokens); i + 1 < body_end; ++i) {
            REQUIRE(bits[i] <= bits[i + 1]);
          }
        }
        auto& prev = prev_bits[{id, l}];
        for (size_t i = 0; i < prev.size(); ++i)
          REQUIRE(bits[i] <= prev[i]);
        prev = bits;
        for (const PageRef& p : t)
          REQUIRE(p.num_tokens <= tokens_per_page(g, p.bits));
      }
    }
  }
  for (const auto& [id, n] : live)
    m.release(id);
  CHECK(m.pool().num_used() == 0);
  CHECK(demotions_seen > 0);
  (void)over_budget_events;
}

TEST_CASE("kv manager: planned ops on a real pool keep every token's values", "[kv][manager]") {
  const auto policy = GENERATE(DemotionPolicy::kBlock, DemotionPolicy::kOldestFirst);
  std::mt19937 rng(policy == DemotionPolicy::kBlock ? 21 : 22);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  KvCacheConfig c;
  c.policy = policy;
  c.sink_tokens = 1;
  c.window_tokens = 8;
  const PageGeometry g{2, 16, 4};
  const int32_t width = g.num_kv_heads * g.head_dim;
  KvCacheManager m(1, g, 64, c, {7 * page_bytes(g)});
  std::vector<std::byte> bytes(64 * page_bytes(g), std::byte{0x33});
  const cpu::KvPoolView pool{bytes.data(), page_bytes(g), g};
  std::vector<float> exact_k, exact_v;
  std::vector<float> prev_k, prev_v;  // every token read back after the last step
  for (int step = 0; step < 60; ++step) {
    const int32_t n = step == 0 ? 13 : 1 + static_cast<int32_t>(rng() % 3);
    std::vector<float> k(n * width), v(n * width);
    for (float& x : k)
      x = dist(rng);
    for (float& x : v)
      x = dist(rng);
    auto ops = ops_for(m);
    auto w = writes_for(m);
    const AppendStatus st = m.append(1, n, &ops, &w);
    if (st == AppendStatus::kOverBudgetAtFloor) break;
    REQUIRE(st == AppendStatus::kOk);
    cpu::write_kv_slots(pool, w[0], n, k.data(), width, v.data(), width);
    {
      // What this step's attention reads (ops not run yet): every earlier token exactly as the
      // last step left it.
      const int32_t total = m.num_tokens(1);
      std::vector<float> ak(total * width), av(total * width);
      cpu::read_kv(pool, m.attention_table(1, 0), total, ak.data(), av.data());
      INFO("step " << step);
      REQUIRE(std::equal(prev_k.begin(), prev_k.end(), ak.begin()));
      REQUIRE(std::equal(prev_v.begin(), prev_v.end(), av.begin()));
    }
    for (const RequantOp& op : ops.layers[0].requant)
      cpu::apply_requant(pool, op);
    for (const auto& wave : ops.layers[0].demote_waves) {
      for (const DemoteOp& op : wave)
        cpu::apply_demote(pool, op);
    }
    m.end_step();
    exact_k.insert(exact_k.end(), k.begin(), k.end());
    exact_v.insert(exact_v.end(), v.begin(), v.end());
    // every token reads back within half a step of its current bits (+ the 16-bit step before)
    const auto t = m.table(1, 0);
    const int32_t total = m.num_tokens(1);
    std::vector<float> rk(total * width), rv(total * width);
    cpu::read_kv(pool, t, total, rk.data(), rv.data());
    prev_k = rk;
    prev_v = rv;
    const auto bits = token_bits(t);
    for (int32_t i = 0; i < total; ++i) {
      for (int32_t h = 0; h < g.num_kv_heads; ++h) {
        for (int kind = 0; kind < 2; ++kind) {
          const float* x = (kind ? exact_v.data() : exact_k.data()) + i * width + h * g.head_dim;
          const float* y = (kind ? rv.data() : rk.data()) + i * width + h * g.head_dim;
          const float lo = *std::min_element(x, x + g.head_dim);
          const float range = *std::max_element(x, x + g.head_dim) - lo;
          const float step_size = range / float((1u << bits[i]) - 1);
          // 4 and 2 bits keep bf16 params: their rounding moves a value by up to 2^-9 of |zero|
          // plus 2^-9 of the grid's span.
          const float params = bits[i] < 8 ? (std::abs(lo) + range) / 512.0f : 0.0f;
          for (int32_t d = 0; d < g.head_dim; ++d) {
            INFO("step " << step << " token " << i << " bits " << bits[i]);
            REQUIRE(std::abs(y[d] - x[d]) <=
                    0.5f * step_size * 1.01f + range / 65535.0f + params + 1e-5f);
          }
        }
      }
    }
  }
  CHECK(m.seq_stats(1).demotions > 0);
}

TEST_CASE("kv manager: demote_for_pressure frees pages across sequences, values kept",
          "[kv][manager][pressure]") {
  const auto policy = GENERATE(DemotionPolicy::kBlock, DemotionPolicy::kOldestFirst);
  std::mt19937 rng(policy == DemotionPolicy::kBlock ? 31 : 32);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  KvCacheConfig c;
  c.policy = policy;
  c.sink_tokens = 1;
  c.window_tokens = 4;
  const PageGeometry g{1, 16, 4};  // 16-bit pages hold 4 tokens
  const int32_t width = g.num_kv_heads * g.head_dim;
  KvCacheManager m(2, g, 64, c);
  std::vector<std::byte> bytes(64 * page_bytes(g), std::byte{0});
  const cpu::KvPoolView pool{bytes.data(), page_bytes(g), g};
  std::map<SeqId, std::vector<float>> exact;  // per sequence: K of layer 0, V = -K
  auto fill = [&](SeqId id, int32_t n) {
    auto ops = ops_for(m);
    auto w = writes_for(m);
    REQUIRE(m.append(id, n, &ops, &w) == AppendStatus::kOk);
    std::vector<float> k(n * width), v(n * width);
    for (float& x : k)
      x = dist(rng);
    for (size_t i = 0; i < k.size(); ++i)
      v[i] = -k[i];
    for (int32_t l = 0; l < 2; ++l)
      cpu::write_kv_slots(pool, w[l], n, k.data(), width, v.data(), width);
    m.end_step();
    exact[id].insert(exact[id].end(), k.begin(), k.end());
  };
  fill(1, 1 + 16);  // sink + 4 full body pages per layer
  fill(2, 1 + 8);   // sink + 2
  CHECK(m.pressure_demotable_pages() == 2 * (2 + 1));
  const int32_t used = m.pool().num_used();
  auto ops = ops_for(m);
  // One page wanted: the sequence with the most 16-bit body pages (1) gives its first layer.
  const int32_t freed = m.demote_for_pressure(1, &ops);
  CHECK(freed == 2);
  REQUIRE(ops.layers[0].demote_waves.size() == 1);
  CHECK(ops.layers[1].demote_waves.empty());
  for (const auto& wave : ops.layers[0].demote_waves) {
    for (const DemoteOp& op : wave)
      cpu::apply_demote(pool, op);
  }
  m.end_step();
  CHECK(m.pool().num_used() == used - 2);
  CHECK(token_bits(m.table(1, 0)) ==
        std::vector<int>{16, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8});
  CHECK(token_bits(m.table(1, 1))[1] == 16);
  CHECK(m.seq_stats(1).demotions == 2);
  // Layer 0 of sequence 1 reads back within 8-bit precision.
  std::vector<float> rk(17 * width), rv(17 * width);
  cpu::read_kv(pool, m.table(1, 0), 17, rk.data(), rv.data());
  for (int32_t i = 0; i < 17 * width; ++i) {
    CHECK(std::abs(rk[i] - exact[1][i]) < 0.05f);
    CHECK(std::abs(rv[i] + exact[1][i]) < 0.05f);
  }
  // Asking for everything demotes every body one step; at the floor nothing is left.
  int32_t total = 0;
  for (int round = 0; round < 8; ++round) {
    auto more = ops_for(m);
    total += m.demote_for_pressure(1000, &more);
    m.end_step();
  }
  CHECK(m.pressure_demotable_pages() == 0);
  for (SeqId id : {SeqId{1}, SeqId{2}}) {
    for (int32_t l = 0; l < 2; ++l) {
      const auto bits = token_bits(m.table(id, l));
      CHECK(bits.front() == 16);  // the sink stays
      for (size_t i = 1; i < bits.size(); ++i)
        CHECK(bits[i] >= c.floor_bits);
    }
  }
  CHECK(total > 0);
  m.release(1);
  m.release(2);
  CHECK(m.pool().num_used() == 0);
}
