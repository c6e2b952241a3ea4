#include <catch2/catch.hpp>

#include <map>
#include <random>

#include "engine/kv/kv_cache_manager.h"

using namespace pmkv::kv;

namespace {

int32_t pages_of(const KvCacheManager& m, SeqId s) {
  int32_t n = 0;
  for (int32_t l = 0; l < m.num_layers(); ++l) n += static_cast<int32_t>(m.table(s, l).size());
  return n;
}

}  // namespace

TEST_CASE("kv cache manager: tables cover exactly the tokens appended", "[kv][manager]") {
  KvCacheManager m(3, PageGeometry{2, 16, 4}, 100);
  REQUIRE(m.append(1, 10));  // 3 pages per layer: 4 + 4 + 2
  CHECK(m.num_tokens(1) == 10);
  for (int32_t l = 0; l < 3; ++l) {
    auto t = m.table(1, l);
    REQUIRE(t.size() == 3);
    CHECK(t[0].num_tokens == 4);
    CHECK(t[2].num_tokens == 2);
    for (auto& p : t) CHECK(p.bits == 16);
  }
  CHECK(m.pages_needed(1, 2) == 0);
  CHECK(m.pages_needed(1, 3) == 3);
  REQUIRE(m.append(1, 3));
  CHECK(m.table(1, 0).back().num_tokens == 1);
  CHECK(m.pool().num_used() == 12);
  m.release(1);
  CHECK(m.pool().num_used() == 0);
  CHECK_FALSE(m.contains(1));
}

TEST_CASE("kv cache manager: a failed append changes nothing", "[kv][manager]") {
  KvCacheManager m(2, PageGeometry{1, 8, 4}, 5);
  REQUIRE(m.append(7, 8));  // 2 pages x 2 layers
  CHECK_FALSE(m.append(8, 5));  // needs 4 pages, 1 free
  CHECK_FALSE(m.contains(8));
  CHECK(m.pool().num_used() == 4);
  CHECK_FALSE(m.append(7, 1));  // needs 2 pages
  CHECK(m.num_tokens(7) == 8);
}

TEST_CASE("kv cache manager: random workload keeps pool == sum of live pages", "[kv][manager]") {
  KvCacheManager m(4, PageGeometry{2, 16, 8}, 200);
  std::mt19937 rng(99);
  std::map<SeqId, int32_t> live;
  for (int step = 0; step < 3000; ++step) {
    const SeqId s = rng() % 12;
    if (rng() % 5 == 0) {
      m.release(s);
      live.erase(s);
    } else {
      const int32_t n = 1 + static_cast<int32_t>(rng() % 40);
      const bool ok = m.append(s, n);
      if (ok) live[s] += n;
    }
    int32_t sum = 0;
    for (auto& [id, n] : live) {
      REQUIRE(m.num_tokens(id) == n);
      for (int32_t l = 0; l < m.num_layers(); ++l) {
        int32_t tokens = 0;
        for (auto& p : m.table(id, l)) tokens += p.num_tokens;
        REQUIRE(tokens == n);
      }
      sum += pages_of(m, id);
    }
    REQUIRE(m.pool().num_used() == sum);
  }
}
