#pragma once
// PM-KVQ's quantizer for one group (one token of one KV head: head_dim values), bit-exact with the
// CUDA kernels: asymmetric round-to-nearest-even, scale = clamp((max - min) / (2^b - 1), 1e-5,
// 1e5), zero = -min (never rounded), code = clamp(round((x + zero) / scale), 0, 2^b - 1), value =
// code * scale - zero. Packing as kernels/kv_page_layout.h describes.
#include <cstddef>
#include <cstdint>
#include <span>

namespace pmkv::kv {

struct GroupParams {
  float scale;
  float zero;
};

// Quantizes x (head_dim values) at `bits` into `row` (at least row_bytes(head_dim, bits) bytes;
// padding bytes are zeroed).
GroupParams quantize_group(std::span<const float> x, int bits, std::span<std::byte> row);

// The code of element i of a packed row.
uint32_t unpack_code(std::span<const std::byte> row, int bits, int i);

// Dequantizes a packed row of out.size() codes.
void dequantize_group(std::span<const std::byte> row, int bits, GroupParams p,
                      std::span<float> out);

}  // namespace pmkv::kv
