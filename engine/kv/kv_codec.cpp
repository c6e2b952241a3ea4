#include "engine/kv/kv_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace pmkv::kv {

GroupParams quantize_group(std::span<const float> x, int bits, std::span<std::byte> row) {
  float lo = x[0], hi = x[0];
  for (float v : x) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const uint32_t qmax = (bits == 16) ? 65535u : ((1u << bits) - 1u);
  const float scale = std::clamp((hi - lo) / static_cast<float>(qmax), 1e-5f, 1e5f);
  const float zero = -lo;
  std::memset(row.data(), 0, row.size());
  auto* bytes = reinterpret_cast<uint8_t*>(row.data());
  for (size_t i = 0; i < x.size(); ++i) {
    const float r = std::nearbyint((x[i] + zero) / scale);  // round half to even (default mode)
    const uint32_t q = static_cast<uint32_t>(std::clamp(r, 0.0f, static_cast<float>(qmax)));
    if (bits == 16) {
      bytes[2 * i] = static_cast<uint8_t>(q & 0xff);
      bytes[2 * i + 1] = static_cast<uint8_t>(q >> 8);
    } else {
      const size_t bit = i * bits;
      bytes[bit / 8] |= static_cast<uint8_t>(q << (bit % 8));
    }
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

}  // namespace pmkv::kv
