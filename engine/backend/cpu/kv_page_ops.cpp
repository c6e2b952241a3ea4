#include "engine/backend/cpu/kv_page_ops.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "engine/kv/kv_codec.h"

namespace pmkv::cpu {

namespace {

// Re-codes token `from_slot` of page `src` (layout ls) into token `to_slot` of `dst` (layout ld),
// K and V of every head.
void recode_token(const std::byte* src, const kv::PageLayout& ls, int32_t from_slot, int from_bits,
                  std::byte* dst, const kv::PageLayout& ld, int32_t to_slot, int to_bits,
                  int32_t head_dim) {
  for (int32_t h = 0; h < ls.heads; ++h) {
    for (int kind = 0; kind < 2; ++kind) {
      const int64_t sc = kind == 0 ? ls.k_codes : ls.v_codes;
      const int64_t sp = kind == 0 ? ls.k_params : ls.v_params;
      const int64_t dc = kind == 0 ? ld.k_codes : ld.v_codes;
      const int64_t dp = kind == 0 ? ld.k_params : ld.v_params;
      kv::GroupParams p;
      kv::load_params(reinterpret_cast<const uint8_t*>(src + ls.param(sp, from_slot, h)), from_bits,
                      p.scale, p.zero);
      p = kv::shrink_row({src + ls.code_row(sc, from_slot, h), static_cast<size_t>(ls.row)},
                         from_bits, p, head_dim, to_bits,
                         {dst + ld.code_row(dc, to_slot, h), static_cast<size_t>(ld.row)});
      kv::store_params(reinterpret_cast<uint8_t*>(dst + ld.param(dp, to_slot, h)), to_bits, p.scale,
                       p.zero);
    }
  }
}

}  // namespace

void apply_requant(const KvPoolView& pool, const kv::RequantOp& op) {
  if (op.src == op.dst || op.dst_bits > op.src_bits) {
    throw std::logic_error("apply_requant: bad op");
  }
  const kv::PageLayout ls = kv::page_layout(pool.geometry, op.src_bits);
  const kv::PageLayout ld = kv::page_layout(pool.geometry, op.dst_bits);
  const std::byte* src = pool.base + int64_t{op.src} * pool.page_bytes;
  std::byte* dst = pool.base + int64_t{op.dst} * pool.page_bytes;
  for (int32_t t = 0; t < op.count; ++t) {
    recode_token(src, ls, op.src_slot + t, op.src_bits, dst, ld, op.dst_slot + t, op.dst_bits,
                 pool.geometry.head_dim);
  }
}

void apply_demote(const KvPoolView& pool, const kv::DemoteOp& op) {
  if (op.num_src < 1 || op.num_src > kv::DemoteOp::kMaxSources || op.to_bits > op.from_bits ||
      op.num_src > op.from_bits / op.to_bits) {
    throw std::logic_error("apply_demote: bad op");
  }
  const kv::PageLayout ls = kv::page_layout(pool.geometry, op.from_bits);
  const kv::PageLayout ld = kv::page_layout(pool.geometry, op.to_bits);
  // The destination is the first source: read every source before writing (a GPU CTA stages the
  // sources in shared memory the same way).
  std::vector<std::byte> staged(static_cast<size_t>(op.num_src) * pool.page_bytes);
  for (int32_t i = 0; i < op.num_src; ++i) {
    std::memcpy(staged.data() + i * pool.page_bytes,
                pool.base + int64_t{op.src[i]} * pool.page_bytes, pool.page_bytes);
  }
  std::byte* dst = pool.base + int64_t{op.src[0]} * pool.page_bytes;
  std::memset(dst, 0, pool.page_bytes);
  int32_t slot = 0;
  for (int32_t i = 0; i < op.num_src; ++i) {
    for (int32_t t = 0; t < op.tokens[i]; ++t) {
      recode_token(staged.data() + i * pool.page_bytes, ls, t, op.from_bits, dst, ld, slot++,
                   op.to_bits, pool.geometry.head_dim);
    }
  }
  if (slot > ld.tokens) throw std::logic_error("apply_demote: tokens exceed the page");
}

}  // namespace pmkv::cpu
