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
//   [K codes: H x T x row_bytes(b)] [V codes: same] [K params: H x T x param_bytes(b)]
//   [V params: same]
// Head-major: the T rows of one KV head are contiguous, so a decode CTA working on one head reads
// one run of bytes per page. Codes of one (token, head) are one row of head_dim codes, 16-byte
// aligned (one 16-byte load reads 128/b codes). Dequantized value = code * scale - zero (PM-KVQ:
// zero = -min). Packing inside a row: 16-bit codes are little-endian uint16; for b < 16 code i sits
// in byte (i * b) / 8 at bit offset (i * b) % 8 (least significant bits first). Params of one
// (token, head): 16- and 8-bit pages {f32 scale, f32 zero}; 4- and 2-bit pages {bf16 scale, bf16
// zero} (one little-endian word: scale in the low half), see param_bytes.
#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

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
// Bytes of the {scale, zero} of one (token, head) at `bits`. 16- and 8-bit pages keep two f32:
// a bf16 scale would cost their codes precision (an 8-bit step is range / 255, and bf16 rounding
// of the scale moves the top code by up to range / 512). 4- and 2-bit pages keep two bf16, as
// PM-KVQ's reference keeps all of them: the rounding stays under 2% of their steps (range / 15,
// range / 3), and the 2-bit layout, which sets the page size (it carries the most params), shrinks
// by 10% at head_dim 128 (80 -> 72 bytes a token and head), so every page does.
PMKV_HD constexpr int64_t param_bytes(int bits) {
  return bits >= 8 ? 8 : 4;
}
PMKV_HD constexpr bool has_bf16_params(int bits) {
  return bits < 8;
}

PMKV_HD inline uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
PMKV_HD inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
// bf16 bits of a finite f32, rounded to nearest, ties to even (the same integer steps on host and
// device, so both write the same bytes).
PMKV_HD inline uint32_t bf16_bits_rne(float f) {
  const uint32_t u = f32_bits(f);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
// The value a page at `bits` keeps of a param computed in f32: itself, or its bf16 rounding.
// Quantizers round scale and zero first and code with the rounded values.
PMKV_HD inline float stored_param(int bits, float v) {
  return has_bf16_params(bits) ? f32_from_bits(bf16_bits_rne(v) << 16) : v;
}
// {scale, zero} at `at` (PageLayout::param's address) in the format of a page at `bits`.
PMKV_HD inline void store_params(uint8_t* at, int bits, float scale, float zero) {
  if (has_bf16_params(bits)) {
    const uint32_t w = bf16_bits_rne(scale) | (bf16_bits_rne(zero) << 16);
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint32_t*>(at) = w;
#else
    std::memcpy(at, &w, sizeof w);
#endif
  } else {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<float2*>(at) = make_float2(scale, zero);
#else
    std::memcpy(at, &scale, sizeof scale);
    std::memcpy(at + sizeof scale, &zero, sizeof zero);
#endif
  }
}
PMKV_HD inline void load_params(const uint8_t* at, int bits, float& scale, float& zero) {
  if (has_bf16_params(bits)) {
    uint32_t w;
#if defined(__CUDA_ARCH__)
    w = *reinterpret_cast<const uint32_t*>(at);
#else
    std::memcpy(&w, at, sizeof w);
#endif
    scale = f32_from_bits(w << 16);
    zero = f32_from_bits(w & 0xffff0000u);
  } else {
#if defined(__CUDA_ARCH__)
    const float2 p = *reinterpret_cast<const float2*>(at);
    scale = p.x;
    zero = p.y;
#else
    std::memcpy(&scale, at, sizeof scale);
    std::memcpy(&zero, at + sizeof scale, sizeof zero);
#endif
  }
}

PMKV_HD constexpr int64_t page_used_bytes(const PageGeometry& g, int bits) {
  return int64_t{tokens_per_page(g, bits)} * g.num_kv_heads *
         (2 * row_bytes(g.head_dim, bits) + 2 * param_bytes(bits));
}
// The page size: the largest of the four layouts (at head_dim 128 the 2-bit one, which carries the
// most params), rounded to 256 bytes.
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
  int64_t par;      // bytes per (token, head) params: param_bytes(bits)
  int64_t k_codes;  // byte offsets inside the page
  int64_t v_codes;
  int64_t k_params;
  int64_t v_params;

  PMKV_HD constexpr int64_t code_row(int64_t base, int32_t token, int32_t head) const {
    return base + (int64_t{head} * tokens + token) * row;
  }
  PMKV_HD constexpr int64_t param(int64_t base, int32_t token, int32_t head) const {
    return base + (int64_t{head} * tokens + token) * par;
  }
};

PMKV_HD constexpr PageLayout page_layout(const PageGeometry& g, int bits) {
  PageLayout l{};
  l.tokens = tokens_per_page(g, bits);
  l.heads = g.num_kv_heads;
  l.row = row_bytes(g.head_dim, bits);
  l.par = param_bytes(bits);
  const int64_t codes = int64_t{l.tokens} * l.heads * l.row;
  l.k_codes = 0;
  l.v_codes = codes;
  l.k_params = 2 * codes;
  l.v_params = 2 * codes + int64_t{l.tokens} * l.heads * l.par;
  return l;
}

}  // namespace pmkv::kv
