#include "engine/kv/kv_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kv_page_layout.h"

namespace pmkv::kv {

namespace {

void pack_code(std::byte* row, int bits, int i, uint32_t q) {
  auto* bytes = reinterpret_cast<uint8_t*>(row);
  if (bits == 16) {
    bytes[2 * i] = static_cast<uint8_t>(q & 0xff);
    bytes[2 * i + 1] = static_cast<uint8_t>(q >> 8);
  } else {
    const size_t bit = size_t(i) * bits;
    bytes[bit / 8] |= static_cast<uint8_t>(q << (bit % 8));
  }
}

}  // namespace

GroupParams quantize_group(std::span<const float> x, int bits, std::span<std::byte> row) {
  float lo = x[0], hi = x[0];
  for (float v : x) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const uint32_t qmax = (bits == 16) ? 65535u : ((1u << bits) - 1u);
  // The page keeps scale and zero in its format (bf16 at 4 and 2 bits): code with those values.
  const float scale =
      stored_param(bits, std::clamp((hi - lo) / static_cast<float>(qmax), 1e-5f, 1e5f));
  const float zero = stored_param(bits, -lo);
  std::memset(row.data(), 0, row.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float r = std::nearbyint((x[i] + zero) / scale);  // round half to even (default mode)
    pack_code(row.data(), bits, static_cast<int>(i),
              static_cast<uint32_t>(std::clamp(r, 0.0f, static_cast<float>(qmax))));
  }
  return {scale, zero};
}

uint32_t unpack_code(std::span<const std::byte> row, int bits, int i) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(row.data());
  if (bits == 16) return uint32_t{bytes[2 * i]} | (uint32_t{bytes[2 * i + 1]} << 8);
  const size_t bit = size_t(i) * bits;
  return (bytes[bit / 8] >> (bit % 8)) & ((1u << bits) - 1u);
}

void dequantize_group(std::span<const std::byte> row, int bits, GroupParams p,
                      std::span<float> out) {
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<float>(unpack_code(row, bits, static_cast<int>(i))) * p.scale - p.zero;
  }
}

uint32_t shrink_code(uint32_t q, int from_bits) {
  const uint32_t c = static_cast<uint32_t>(from_bits / 2);
  const uint32_t mul = (1u << (2 * c)) - (1u << c) + 1u;
  const uint32_t add = (1u << (3 * c - 1)) - (1u << (2 * c - 1)) + (1u << (c - 1));
  return ((q * mul + add) >> (3 * c)) & ((1u << c) - 1u);
}

float shrink_scale(float scale, int from_bits) {
  return scale * static_cast<float>((1u << (from_bits / 2)) + 1u);
}

GroupParams shrink_row(std::span<const std::byte> row, int from_bits, GroupParams p, int n,
                       int to_bits, std::span<std::byte> out) {
  std::memset(out.data(), 0, out.size());
  for (int i = 0; i < n; ++i) {
    uint32_t q = unpack_code(row, from_bits, i);
    for (int b = from_bits; b > to_bits; b /= 2)
      q = shrink_code(q, b);
    pack_code(out.data(), to_bits, i, q);
  }
  for (int b = from_bits; b > to_bits; b /= 2)
    p.scale = shrink_scale(p.scale, b);
  return {stored_param(to_bits, p.scale), stored_param(to_bits, p.zero)};
}

}  // namespace pmkv::kv
