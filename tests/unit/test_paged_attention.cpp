#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "engine/backend/cpu/paged_attention.h"
#include "engine/kv/kv_cache_manager.h"

using namespace pmkv;

namespace {

// Reference attention in double over exact K/V.
std::vector<double> reference(const cpu::AttentionShape& s, const std::vector<float>& q, int n,
                              int first, const std::vector<float>& k,
                              const std::vector<float>& v) {
  const int d = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int kvw = s.num_kv_heads * d, qw = s.num_heads * d;
  std::vector<double> out(static_cast<size_t>(n) * qw, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < s.num_heads; ++h) {
      const int t = first + i;
      std::vector<double> w;
      double m = -1e300;
      for (int j = 0; j <= t; ++j) {
        const bool visible = s.sliding_window == 0 || t - j < s.sliding_window;
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += double(q[i * qw + h * d + c]) * k[j * kvw + (h / group) * d + c];
        w.push_back(visible ? dot * s.scale : -INFINITY);
        if (visible) m = std::max(m, w.back());
      }
      double sum = 0;
      for (double& x : w) sum += (x = std::exp(x - m));
      for (int j = 0; j <= t; ++j) {
        for (int c = 0; c < d; ++c) out[i * qw + h * d + c] += w[j] / sum * v[j * kvw + (h / group) * d + c];
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("paged attention: write/read through 16-bit pages and attend like the reference",
          "[kv][attention]") {
  std::mt19937 rng(GENERATE(1u, 2u, 3u));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const int heads = 8, kv_heads = 2, d = 16;
  const int window = GENERATE(0, 5);
  const kv::PageGeometry g{kv_heads, d, 4};
  kv::KvCacheConfig cfg;
  cfg.window_tokens = 8;
  kv::KvCacheManager mgr(1, g, 64, cfg);  // 16-bit body: flushes relabel pages, no ops
  std::vector<std::byte> pool_bytes(64 * kv::page_bytes(g), std::byte{0x5A});
  const cpu::KvPoolView pool{pool_bytes.data(), kv::page_bytes(g), g};
  const cpu::AttentionShape shape{heads, kv_heads, d, window, 1.0f / std::sqrt(float(d))};

  const int cached = 13, n = 6, total = cached + n, kvw = kv_heads * d, qw = heads * d;
  std::vector<float> k(total * kvw), v(total * kvw), q(n * qw);
  for (auto* vec : {&k, &v, &q}) {
    for (float& x : *vec) x = dist(rng);
  }
  // Two steps: the cached tokens, then the new chunk.
  std::vector<std::vector<kv::KvWrite>> w(1);
  REQUIRE(mgr.append(1, cached, nullptr, &w) == kv::AppendStatus::kOk);
  cpu::write_kv_slots(pool, w[0], cached, k.data(), kvw, v.data(), kvw);
  w[0].clear();
  REQUIRE(mgr.append(1, n, nullptr, &w) == kv::AppendStatus::kOk);
  cpu::write_kv_slots(pool, w[0], n, &k[cached * kvw], kvw, &v[cached * kvw], kvw);

  std::vector<float> k2(total * kvw, NAN), v2(total * kvw, NAN);
  cpu::read_kv(pool, mgr.table(1, 0), total, k2.data(), v2.data());
  for (size_t i = 0; i < k.size(); ++i) {
    REQUIRE(std::abs(k2[i] - k[i]) < 1e-4f);
    REQUIRE(std::abs(v2[i] - v[i]) < 1e-4f);
  }

  std::vector<float> out(n * qw, NAN);
  cpu::causal_attention(shape, q.data(), qw, n, cached, k2.data(), v2.data(), out.data(), qw);
  const auto ref = reference(shape, q, n, cached, k, v);
  for (size_t i = 0; i < out.size(); ++i) {
    INFO("element " << i);
    REQUIRE(std::abs(out[i] - ref[i]) < 1e-4);
  }
}
