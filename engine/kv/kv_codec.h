#pragma once
// PM-KVQ's quantizer for one group (one token of one KV head: head_dim values), bit-exact with the
// CUDA kernels: asymmetric round-to-nearest-even, scale = clamp((max - min) / (2^b - 1), 1e-5,
// 1e5), zero = -min (never rounded), code = clamp(round((x + zero) / scale), 0, 2^b - 1), value =
// code * scale - zero. Packing as kernels/kv_page_layout.h describes; scale and zero are rounded
// to the page's param format (kv::stored_param: bf16 at 4 and 2 bits) before the codes are made.
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

// PM-KVQ's "equivalent right shift" of one code from b to c = b/2 bits, in the integer domain:
// q' = round(q * (2^c - 1) / (2^b - 1)) = (q * (2^2c - 2^c + 1) + 2^(3c-1) - 2^(2c-1) + 2^(c-1))
// >> 3c, masked to c bits (uint32 arithmetic: exact for 16 -> 8). The group's scale becomes
// scale * (2^c + 1) (one fp32 multiply per halving); the zero is unchanged.
uint32_t shrink_code(uint32_t q, int from_bits);
float shrink_scale(float scale, int from_bits);

// Re-codes a packed row of n codes from `from_bits` to `to_bits` (<= from_bits, by repeated
// halving) into `out` (row_bytes(n, to_bits) bytes, padding zeroed); returns the new params, in
// the format of a to_bits page (the scale chain runs in f32, then both are rounded once).
GroupParams shrink_row(std::span<const std::byte> row, int from_bits, GroupParams p, int n,
                       int to_bits, std::span<std::byte> out);

}  // namespace pmkv::kv
