#pragma once
// The one place that knows the bytes of a KV page. The engine sizes its pool with it, the CPU
// backend and the CUDA kernels address pages with it. Host and device; no engine headers.
//
// A page holds the K and V of a run of consecutive tokens of one (sequence, layer), all KV heads,
// at one bit-width b in {16, 8, 4, 2}. Every page has the same byte size (page_bytes); a page at b
// bits holds tokens_per_page(b) = tokens16 * 16 / b tokens, so two b-bit pages demote into one
// b/2-bit page.
//
// Byte layout of a page at b bits, T = tokens_per_page(b), H = num_kv_heads:
//   [K codes: H x T x row_bytes(b)] [V codes: same] [K params: H x T x {f32 scale, f32 zero}]
//   [V params: same]
// Head-major: the T rows of one KV head are contiguous, so a decode CTA working on one head reads
// one run of bytes per page. Codes of one (token, head) are one row of head_dim codes, 16-byte
// aligned (one 16-byte load reads 128/b codes). Dequantized value = code * scale - zero (PM-KVQ: zero = -min).
// Packing inside a row: 16-bit codes are little-endian uint16; for b < 16 code i sits in byte
// (i * b) / 8 at bit offset (i * b) % 8 (least significant bits first).
#include <cstdint>

#if defined(__CUDACC__)
#define PMKV_HD __host__ __device__
#else
#define PMKV_HD
#endif

namespace pmkv::kv {

struct PageGeometry {
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t tokens16 = 0;  // tokens in a 16-bit page
};

PMKV_HD constexpr bool is_valid_bits(int bits) {
  return bits == 16 || bits == 8 || bits == 4 || bits == 2;
}
PMKV_HD constexpr int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

PMKV_HD constexpr int64_t row_bytes(int32_t head_dim, int bits) {
  return round_up(int64_t{head_dim} * bits / 8, 16);
}
PMKV_HD constexpr int32_t tokens_per_page(const PageGeometry& g, int bits) {
  return g.tokens16 * (16 / bits);
}
// Scale and zero of one (token, head): two f32.
inline constexpr int64_t kParamBytes = 8;

PMKV_HD constexpr int64_t page_used_bytes(const PageGeometry& g, int bits) {
  return int64_t{tokens_per_page(g, bits)} * g.num_kv_heads *
         (2 * row_bytes(g.head_dim, bits) + 2 * kParamBytes);
}
// The page size: the largest of the four layouts (the 2-bit one carries the most params), rounded
// to 256 bytes.
PMKV_HD constexpr int64_t page_bytes(const PageGeometry& g) {
  int64_t m = 0;
  for (int b = 16; b >= 2; b /= 2) {
    const int64_t u = page_used_bytes(g, b);
    m = u > m ? u : m;
  }
  return round_up(m, 256);
}

struct PageLayout {
  int32_t tokens;  // tokens the page holds at this bit-width
  int32_t heads;
  int64_t row;      // bytes per (token, head) code row
  int64_t k_codes;  // byte offsets inside the page
  int64_t v_codes;
  int64_t k_params;
  int64_t v_params;

  PMKV_HD constexpr int64_t code_row(int64_t base, int32_t token, int32_t head) const {
    return base + (int64_t{head} * tokens + token) * row;
  }
  PMKV_HD constexpr int64_t param(int64_t base, int32_t token, int32_t head) const {
    return base + (int64_t{head} * tokens + token) * kParamBytes;
  }
};

PMKV_HD constexpr PageLayout page_layout(const PageGeometry& g, int bits) {
  PageLayout l{};
  l.tokens = tokens_per_page(g, bits);
  l.heads = g.num_kv_heads;
  l.row = row_bytes(g.head_dim, bits);
  const int64_t codes = int64_t{l.tokens} * l.heads * l.row;
  l.k_codes = 0;
  l.v_codes = codes;
  l.k_params = 2 * codes;
  l.v_params = 2 * codes + int64_t{l.tokens} * l.heads * kParamBytes;
  return l;
}

}  // namespace pmkv::kv
