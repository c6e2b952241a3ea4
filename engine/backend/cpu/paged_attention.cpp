#include "engine/backend/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "engine/kv/kv_codec.h"

namespace pmkv::cpu {

namespace {

// Visits token slots [from, to) of a table: fn(page_ref, slot_in_page, token_index).
template <class Fn>
void for_each_slot(std::span<const kv::PageRef> table, int32_t from, int32_t to, Fn&& fn) {
  int32_t base = 0;
  for (const kv::PageRef& p : table) {
    const int32_t end = base + p.num_tokens;
    for (int32_t t = std::max(from, base); t < std::min(to, end); ++t)
      fn(p, t - base, t);
    base = end;
    if (base >= to) return;
  }
  if (base < to) throw std::logic_error("paged attention: page table shorter than its tokens");
}

}  // namespace

void write_kv(const KvPoolView& pool, std::span<const kv::PageRef> table, int32_t first_token,
              int32_t n, const float* k, int64_t k_stride, const float* v, int64_t v_stride) {
  const auto& g = pool.geometry;
  for_each_slot(
      table, first_token, first_token + n, [&](const kv::PageRef& p, int32_t slot, int32_t t) {
        const kv::PageLayout l = kv::page_layout(g, p.bits);
        std::byte* page = pool.base + int64_t{p.page} * pool.page_bytes;
        const int32_t r = t - first_token;
        for (int32_t h = 0; h < g.num_kv_heads; ++h) {
          for (int kind = 0; kind < 2; ++kind) {
            const float* src =
                (kind == 0 ? k + r * k_stride : v + r * v_stride) + int64_t{h} * g.head_dim;
            const int64_t codes = kind == 0 ? l.k_codes : l.v_codes;
            const int64_t params = kind == 0 ? l.k_params : l.v_params;
            const kv::GroupParams gp =
                kv::quantize_group({src, static_cast<size_t>(g.head_dim)}, p.bits,
                                   {page + l.code_row(codes, slot, h), static_cast<size_t>(l.row)});
            kv::store_params(reinterpret_cast<uint8_t*>(page + l.param(params, slot, h)), p.bits,
                             gp.scale, gp.zero);
          }
        }
      });
}

void write_kv_slots(const KvPoolView& pool, std::span<const kv::KvWrite> writes, int32_t n,
                    const float* k, int64_t k_stride, const float* v, int64_t v_stride) {
  int32_t row = 0;
  for (const kv::KvWrite& w : writes) {
    const kv::PageRef page{w.page, 16, w.slot + w.count};
    write_kv(pool, {&page, 1}, w.slot, w.count, k + row * k_stride, k_stride, v + row * v_stride,
             v_stride);
    row += w.count;
  }
  if (row != n) throw std::logic_error("write_kv_slots: slots do not cover the new tokens");
}

void read_kv(const KvPoolView& pool, std::span<const kv::PageRef> table, int32_t count,
             float* k_out, float* v_out) {
  const auto& g = pool.geometry;
  const int64_t width = int64_t{g.num_kv_heads} * g.head_dim;
  for_each_slot(table, 0, count, [&](const kv::PageRef& p, int32_t slot, int32_t t) {
    const kv::PageLayout l = kv::page_layout(g, p.bits);
    const std::byte* page = pool.base + int64_t{p.page} * pool.page_bytes;
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      for (int kind = 0; kind < 2; ++kind) {
        float* dst = (kind == 0 ? k_out : v_out) + t * width + int64_t{h} * g.head_dim;
        const int64_t codes = kind == 0 ? l.k_codes : l.v_codes;
        const int64_t params = kind == 0 ? l.k_params : l.v_params;
        kv::GroupParams gp;
        kv::load_params(reinterpret_cast<const uint8_t*>(page + l.param(params, slot, h)), p.bits,
                        gp.scale, gp.zero);
        kv::dequantize_group({page + l.code_row(codes, slot, h), static_cast<size_t>(l.row)},
                             p.bits, gp, {dst, static_cast<size_t>(g.head_dim)});
      }
    }
  });
}

void causal_attention(const AttentionShape& s, const float* q, int64_t q_stride, int32_t n,
                      int32_t first_token, const float* k, const float* v, float* out,
                      int64_t out_stride) {
  const int32_t group = s.num_heads / s.num_kv_heads;
  const int64_t kv_width = int64_t{s.num_kv_heads} * s.head_dim;
  const int64_t d = s.head_dim;
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(first_token + n));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int32_t i = 0; i < n; ++i) {
      for (int32_t h = 0; h < s.num_heads; ++h) {
        const int32_t t = first_token + i;  // this query's token index
        const int32_t lo = s.sliding_window > 0 ? std::max(0, t - s.sliding_window + 1) : 0;
        const float* qh = q + i * q_stride + h * d;
        const int64_t kv_off = int64_t{h / group} * d;
        float m = -INFINITY;
        for (int32_t j = lo; j <= t; ++j) {
          const float* kj = k + j * kv_width + kv_off;
          float dot = 0.0f;
          for (int64_t c = 0; c < d; ++c)
            dot += qh[c] * kj[c];
          scores[j] = dot * s.scale;
          m = std::max(m, scores[j]);
        }
        float sum = 0.0f;
        for (int32_t j = lo; j <= t; ++j) {
          scores[j] = std::exp(scores[j] - m);
          sum += scores[j];
        }
        float* o = out + i * out_stride + h * d;
        std::fill(o, o + d, 0.0f);
        for (int32_t j = lo; j <= t; ++j) {
          const float w = scores[j] / sum;
          const float* vj = v + j * kv_width + kv_off;
          for (int64_t c = 0; c < d; ++c)
            o[c] += w * vj[c];
        }
      }
    }
  }
}

}  // namespace pmkv::cpu
