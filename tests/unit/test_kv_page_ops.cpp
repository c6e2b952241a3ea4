#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "engine/backend/cpu/kv_page_ops.h"
#include "engine/kv/kv_codec.h"

using namespace pmkv;

namespace {

struct Pool {
  kv::PageGeometry g{2, 16, 4};
  std::vector<std::byte> bytes = std::vector<std::byte>(8 * kv::page_bytes(g), std::byte{0x77});
  cpu::KvPoolView view() { return {bytes.data(), kv::page_bytes(g), g}; }
};

// Fills `count` tokens of page p at `bits` with random K/V; returns their exact values.
std::vector<float> fill(Pool& pool, kv::PageId p, int bits, int count, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 2.0f);
  const int width = pool.g.num_kv_heads * pool.g.head_dim;
  std::vector<float> kv(2 * count * width);
  for (float& x : kv)
    x = dist(rng);
  const std::vector<kv::PageRef> table = {{p, bits, count}};
  cpu::write_kv(pool.view(), table, 0, count, kv.data(), width, kv.data() + count * width, width);
  return kv;
}

std::vector<float> read(Pool& pool, kv::PageId p, int bits, int count) {
  const int width = pool.g.num_kv_heads * pool.g.head_dim;
  std::vector<float> out(2 * count * width, NAN);
  const std::vector<kv::PageRef> table = {{p, bits, count}};
  cpu::read_kv(pool.view(), table, count, out.data(), out.data() + count * width);
  return out;
}

}  // namespace

TEST_CASE("kv page ops: requant copies tokens at fewer bits, codes shrunk exactly", "[kv][ops]") {
  std::mt19937 rng(11);
  for (int to_bits : {16, 8, 4, 2}) {
    Pool pool;
    const auto exact = fill(pool, 0, 16, 4, rng);
    // tokens 1..3 of page 0 -> slots 2..4 of page 3
    cpu::apply_requant(pool.view(), {0, 16, 1, 3, to_bits, 2, 3});
    const kv::PageLayout ls = kv::page_layout(pool.g, 16), ld = kv::page_layout(pool.g, to_bits);
    const std::byte* src = pool.bytes.data();
    const std::byte* dst = pool.bytes.data() + 3 * kv::page_bytes(pool.g);
    for (int t = 0; t < 3; ++t) {
      for (int h = 0; h < pool.g.num_kv_heads; ++h) {
        for (int i = 0; i < pool.g.head_dim; ++i) {
          uint32_t q =
              kv::unpack_code({src + ls.code_row(ls.v_codes, 1 + t, h), size_t(ls.row)}, 16, i);
          for (int b = 16; b > to_bits; b /= 2)
            q = kv::shrink_code(q, b);
          REQUIRE(kv::unpack_code({dst + ld.code_row(ld.v_codes, 2 + t, h), size_t(ld.row)},
                                  to_bits, i) == q);
        }
      }
    }
    (void)exact;
  }
}

TEST_CASE("kv page ops: demotion folds pages into the first, in token order", "[kv][ops]") {
  std::mt19937 rng(12);
  for (int m = 1; m <= 3; ++m) {
    const int from = 16, to = 16 >> m, k = 1 << m;
    Pool pool;
    std::vector<std::vector<float>> parts;
    kv::DemoteOp op;
    op.from_bits = from;
    op.to_bits = to;
    op.num_src = k;
    const int width = pool.g.num_kv_heads * pool.g.head_dim;
    int total = 0;
    for (int i = 0; i < k; ++i) {
      const int count = (i == k - 1) ? 2 : 4;  // the last page may be partly filled
      op.src[i] = 7 - i;                       // any order of ids
      op.tokens[i] = count;
      fill(pool, op.src[i], from, count, rng);
      parts.push_back(read(pool, op.src[i], from, count));
      total += count;
    }
    cpu::apply_demote(pool.view(), op);
    const auto after = read(pool, op.src[0], to, total);
    // Each token's dequantized value moves by at most one new quantization step from before.
    int t0 = 0;
    for (int i = 0; i < k; ++i) {
      const int count = op.tokens[i];
      for (int kind = 0; kind < 2; ++kind) {
        for (int t = 0; t < count; ++t) {
          for (int c = 0; c < width; ++c) {
            // the group (token, head) this value belongs to sets the quantization step
            const int g0 = c / pool.g.head_dim * pool.g.head_dim;
            const float* grp = &parts[i][kind * count * width + t * width + g0];
            const float lo = *std::min_element(grp, grp + pool.g.head_dim);
            const float range = *std::max_element(grp, grp + pool.g.head_dim) - lo;
            const float before = parts[i][kind * count * width + t * width + c];
            const float now = after[kind * total * width + (t0 + t) * width + c];
            // plus the bf16 rounding of a 4- or 2-bit page's params (2^-9 of |zero| and of the
            // span)
            const float params = to < 8 ? (std::abs(lo) + range) / 512.0f : 0.0f;
            REQUIRE(std::abs(now - before) <=
                    0.5f * range / float((1 << to) - 1) * 1.001f + params + 1e-4f);
          }
        }
      }
      t0 += count;
    }
  }
}
