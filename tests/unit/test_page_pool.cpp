#include <catch2/catch.hpp>

#include <random>
#include <set>

#include "engine/kv/page_pool.h"

using pmkv::kv::PageId;
using pmkv::kv::PagePool;

TEST_CASE("page pool: allocates every page once, then reports exhaustion", "[kv][pool]") {
  PagePool pool(5);
  std::set<PageId> got;
  for (int i = 0; i < 5; ++i) {
    auto p = pool.allocate();
    REQUIRE(p);
    REQUIRE(got.insert(*p).second);
  }
  CHECK_FALSE(pool.allocate());
  CHECK(pool.num_used() == 5);
  CHECK(pool.peak_used() == 5);
  pool.free(3);
  CHECK(pool.num_free() == 1);
  CHECK(pool.allocate() == PageId{3});
}

TEST_CASE("page pool: double free and foreign ids are errors", "[kv][pool]") {
  PagePool pool(2);
  const PageId p = *pool.allocate();
  pool.free(p);
  CHECK_THROWS_AS(pool.free(p), std::logic_error);
  CHECK_THROWS_AS(pool.free(7), std::logic_error);
  CHECK_THROWS_AS(pool.free(-1), std::logic_error);
}

TEST_CASE("page pool: random allocate/free keeps the counts consistent", "[kv][pool]") {
  PagePool pool(64);
  std::mt19937 rng(7);
  std::vector<PageId> held;
  for (int step = 0; step < 5000; ++step) {
    if (rng() % 2 && !held.empty()) {
      const size_t i = rng() % held.size();
      pool.free(held[i]);
      held.erase(held.begin() + static_cast<long>(i));
    } else if (auto p = pool.allocate()) {
      held.push_back(*p);
    } else {
      REQUIRE(held.size() == 64);
    }
    REQUIRE(pool.num_used() == static_cast<int32_t>(held.size()));
    for (PageId p : held) REQUIRE(pool.in_use(p));
  }
}
