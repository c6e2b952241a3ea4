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
        for (float& v : x)
          v = dist(rng) + 10.0f * (trial % 3);
        const GroupParams p = quantize_group(x, bits, row);
        dequantize_group(row, bits, p, y);
        const float lo = *std::min_element(x.begin(), x.end());
        const float hi = *std::max_element(x.begin(), x.end());
        // 4 and 2 bits keep bf16 params (rounded to nearest before the codes are made).
        REQUIRE(p.zero == stored_param(bits, -lo));
        REQUIRE(p.scale == stored_param(bits, (hi - lo) / float((1u << bits) - 1)));
        if (bits < 8) {
          REQUIRE(p.scale == Approx((hi - lo) / float((1u << bits) - 1)).epsilon(1.0 / 256));
        }
        // The ends may clamp by the params' rounding: at most 2^-9 of |zero| and 2^-9 of the
        // range (qmax codes of a scale off by 2^-9 of itself).
        const float rounding = bits < 8 ? (std::abs(lo) + (hi - lo)) / 512.0f : 0.0f;
        for (int i = 0; i < head_dim; ++i) {
          INFO("bits " << bits << " i " << i);
          // half a quantization step, plus float rounding of code * scale - zero
          REQUIRE(std::abs(y[i] - x[i]) <=
                  0.5f * p.scale + 4e-6f * (std::abs(lo) + std::abs(hi)) + rounding);
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
  for (size_t i = 2; i < row.size(); ++i)
    CHECK(row[i] == std::byte{0});
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
  CHECK(p.scale == stored_param(4, 1e-5f));  // bf16 params at 4 bits
  CHECK(quantize_group(x, 8, row).scale == 1e-5f);
  dequantize_group(row, 4, p, y);
  for (float v : y)
    CHECK(v == 2.5f);
}

TEST_CASE("kv page layout: b-bit pages hold twice the tokens of 2b-bit pages and fit", "[kv]") {
  const PageGeometry g{8, 128, 16};
  for (int bits = 16; bits > 2; bits /= 2) {
    CHECK(tokens_per_page(g, bits / 2) == 2 * tokens_per_page(g, bits));
  }
  for (int bits : {16, 8, 4, 2}) {
    const PageLayout l = page_layout(g, bits);
    CHECK(l.row % 16 == 0);
    CHECK(l.par == (bits >= 8 ? 8 : 4));
    CHECK(l.v_params + int64_t{l.tokens} * l.heads * l.par <= page_bytes(g));
    CHECK(l.k_params % 16 == 0);
  }
  // head_dim 128: the 2-bit layout sets the size, 72 bytes a token and head (2 x 32 of codes, 2 x
  // 4 of bf16 params): 128 tokens x 8 heads x 72.
  CHECK(page_bytes(g) == 128 * 8 * 72);
  CHECK(page_used_bytes(g, 16) == 16 * 8 * (2 * 256 + 16));
  CHECK(page_used_bytes(g, 4) == 64 * 8 * (2 * 64 + 8));
}

TEST_CASE("kv page layout: params bytes are fixed (f32 pairs; bf16 pairs at 4 and 2 bits)",
          "[kv][codec]") {
  // bf16 rounding is to nearest, ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
  CHECK(bf16_bits_rne(1.0f) == 0x3F80u);
  CHECK(bf16_bits_rne(1.00390625f) == 0x3F80u);  // tie: to the even 0x3F80
  CHECK(bf16_bits_rne(1.01171875f) == 0x3F82u);  // tie between 0x3F81 and 0x3F82: even
  const float above = std::nextafter(1.00390625f, 2.0f);
  CHECK(bf16_bits_rne(above) == 0x3F81u);  // just above the tie
  CHECK(bf16_bits_rne(-2.5f) == 0xC020u);
  CHECK(stored_param(4, above) == 1.0078125f);
  CHECK(stored_param(8, above) == above);
  uint8_t b[8] = {};
  store_params(b, 2, 1.0f, -2.5f);  // one word: scale low, zero high, little-endian
  const uint8_t want2[8] = {0x80, 0x3F, 0x20, 0xC0, 0, 0, 0, 0};
  for (int i = 0; i < 8; ++i)
    CHECK(b[i] == want2[i]);
  store_params(b, 16, 1.0f, -2.5f);  // two little-endian f32
  const uint8_t want16[8] = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x20, 0xC0};
  for (int i = 0; i < 8; ++i)
    CHECK(b[i] == want16[i]);
  for (int bits : {16, 8, 4, 2}) {
    float s = 0, z = 0;
    store_params(b, bits, 0.3f, -7.1f);
    load_params(b, bits, s, z);
    CHECK(s == stored_param(bits, 0.3f));
    CHECK(z == stored_param(bits, -7.1f));
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
    for (float& v : x)
      v = dist(rng);
    const GroupParams p16 = quantize_group(x, 16, r16);
    const GroupParams p2 = shrink_row(r16, 16, p16, d, 2, r2);
    // 16 -> 8 -> 4 -> 2 multiplies the scale by 257 * 17 * 5 = 65535 / 3: the 2-bit grid of the
    // same min and max, up to fp32 rounding.
    // The 2-bit page keeps them in bf16: the chain's f32 scale and the zero, each rounded once.
    CHECK(p2.zero == stored_param(2, p16.zero));
    CHECK(p2.scale == stored_param(2, p16.scale * 257.0f * 17.0f * 5.0f));
    CHECK(p2.scale == Approx(p16.scale * 65535.0f / 3.0f).epsilon(1.0 / 256));
    dequantize_group(r2, 2, p2, y);
    const GroupParams pd = quantize_group(x, 2, direct);
    dequantize_group(direct, 2, pd, z);
    for (int i = 0; i < d; ++i) {
      // double rounding may move a code by one step at most
      // plus the params' bf16 rounding (2^-9 of |zero| <= 4 and of 3 scales)
      REQUIRE(std::abs(y[i] - x[i]) <= p2.scale * 1.006f + 4.0f / 512 + 1e-5f);
      REQUIRE(std::abs(y[i] - z[i]) <= p2.scale * 1.012f + 8.0f / 512 + 1e-5f);
    }
  }
}
