#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "engine/kv/kv_codec.h"
#include "kernels/kv_page_layout.h"

using namespace pmkv::kv;

TEST_CASE("kv codec: round trip error is at most half a step at every bit-width", "[kv][codec]") {
  std::mt19937 rng(1234);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int bits : {16, 8, 4, 2}) {
    for (int head_dim : {8, 16, 64, 128}) {
      std::vector<float> x(head_dim), y(head_dim);
      std::vector<std::byte> row(row_bytes(head_dim, bits), std::byte{0xAB});
      for (int trial = 0; trial < 50; ++trial) {
        for (float& v : x) v = dist(rng) + 10.0f * (trial % 3);
        const GroupParams p = quantize_group(x, bits, row);
        dequantize_group(row, bits, p, y);
        const float lo = *std::min_element(x.begin(), x.end());
        const float hi = *std::max_element(x.begin(), x.end());
        REQUIRE(p.zero == -lo);
        REQUIRE(p.scale == Approx((hi - lo) / float((1u << bits) - 1)).epsilon(1e-6));
        for (int i = 0; i < head_dim; ++i) {
          INFO("bits " << bits << " i " << i);
          // half a quantization step, plus float rounding of code * scale - zero
          REQUIRE(std::abs(y[i] - x[i]) <= 0.5f * p.scale + 4e-6f * (std::abs(lo) + std::abs(hi)));
        }
      }
    }
  }
}

TEST_CASE("kv codec: packing layout is fixed (LSB first, little-endian 16-bit)", "[kv][codec]") {
  // 8 values spanning exactly [0, 3]: at 2 bits codes equal the values.
  const std::vector<float> x = {0, 1, 2, 3, 3, 2, 1, 0};
  std::vector<std::byte> row(16);
  quantize_group(x, 2, row);
  // byte 0 = 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4; byte 1 = 3 | 2<<2 | 1<<4 | 0<<6 = 0x1B
  CHECK(row[0] == std::byte{0xE4});
  CHECK(row[1] == std::byte{0x1B});
  for (size_t i = 2; i < row.size(); ++i) CHECK(row[i] == std::byte{0});
  // 16-bit: values 0 and 65535 * scale -> codes 0x0000 and 0xFFFF, little-endian.
  const std::vector<float> y = {0.0f, 1.0f};
  std::vector<std::byte> row16(16);
  quantize_group(y, 16, row16);
  CHECK(unpack_code(row16, 16, 0) == 0u);
  CHECK(unpack_code(row16, 16, 1) == 65535u);
  CHECK(row16[2] == std::byte{0xFF});
  CHECK(row16[3] == std::byte{0xFF});
}

TEST_CASE("kv codec: constant groups clamp the scale and stay exact", "[kv][codec]") {
  const std::vector<float> x(16, 2.5f);
  std::vector<float> y(16);
  std::vector<std::byte> row(row_bytes(16, 4));
  const GroupParams p = quantize_group(x, 4, row);
  CHECK(p.scale == 1e-5f);
  dequantize_group(row, 4, p, y);
  for (float v : y) CHECK(v == 2.5f);
}

TEST_CASE("kv page layout: b-bit pages hold twice the tokens of 2b-bit pages and fit", "[kv]") {
  const PageGeometry g{8, 128, 16};
  for (int bits = 16; bits > 2; bits /= 2) {
    CHECK(tokens_per_page(g, bits / 2) == 2 * tokens_per_page(g, bits));
  }
  for (int bits : {16, 8, 4, 2}) {
    const PageLayout l = page_layout(g, bits);
    CHECK(l.row % 16 == 0);
    CHECK(l.v_params + int64_t{l.tokens} * l.heads * kParamBytes <= page_bytes(g));
    CHECK(l.k_params % 16 == 0);
  }
}

TEST_CASE("kv codec: shrinking equals round(q * (2^c - 1) / (2^b - 1)) on every code value",
          "[kv][codec]") {
  for (int b : {16, 8, 4}) {
    const uint64_t c = b / 2, qmax = (1ull << b) - 1, cmax = (1ull << c) - 1;
    for (uint64_t q = 0; q <= qmax; ++q) {
      // exact rational rounding, half up (a tie never happens: 2^c + 1 is odd)
      const uint64_t num = q * cmax, den = qmax;
      const uint64_t want = (2 * num + den) / (2 * den);
      REQUIRE(shrink_code(static_cast<uint32_t>(q), b) == want);
    }
  }
  CHECK(shrink_scale(1.0f, 16) == 257.0f);
  CHECK(shrink_scale(1.0f, 8) == 17.0f);
  CHECK(shrink_scale(1.0f, 4) == 5.0f);
}

TEST_CASE("kv codec: a shrunk row dequantizes to the same grid end points", "[kv][codec]") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  const int d = 64;
  std::vector<float> x(d), y(d), z(d);
  std::vector<std::byte> r16(row_bytes(d, 16)), r2(row_bytes(d, 2)), direct(row_bytes(d, 2));
  for (int trial = 0; trial < 100; ++trial) {
    for (float& v : x) v = dist(rng);
    const GroupParams p16 = quantize_group(x, 16, r16);
    const GroupParams p2 = shrink_row(r16, 16, p16, d, 2, r2);
    // 16 -> 8 -> 4 -> 2 multiplies the scale by 257 * 17 * 5 = 65535 / 3: the 2-bit grid of the
    // same min and max, up to fp32 rounding.
    CHECK(p2.zero == p16.zero);
    CHECK(p2.scale == Approx(p16.scale * 65535.0f / 3.0f).epsilon(1e-6));
    dequantize_group(r2, 2, p2, y);
    const GroupParams pd = quantize_group(x, 2, direct);
    dequantize_group(direct, 2, pd, z);
    for (int i = 0; i < d; ++i) {
      // double rounding may move a code by one step at most
      REQUIRE(std::abs(y[i] - x[i]) <= p2.scale * 1.0f + 1e-5f);
      REQUIRE(std::abs(y[i] - z[i]) <= p2.scale * 1.0001f + 1e-5f);
    }
  }
}
