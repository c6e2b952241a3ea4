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
