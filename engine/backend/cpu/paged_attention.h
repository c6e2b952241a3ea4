#pragma once
// Attention over the paged KV cache on the CPU: the semantics the CUDA kernels must reproduce.
// Pages are addressed through kernels/kv_page_layout.h and coded with engine/kv/kv_codec.h, so the
// CPU backend exercises the real page format.
#include <cstddef>
#include <cstdint>
#include <span>

#include "engine/kv/page_table.h"
#include "kernels/kv_page_layout.h"

namespace pmkv::cpu {

struct KvPoolView {
  std::byte* base;  // page p starts at base + p * page_bytes
  int64_t page_bytes;
  kv::PageGeometry geometry;
};

// Quantizes and stores the K and V of tokens [first_token, first_token + n) of one (sequence,
// layer) into their slots of `table`. k and v are [n, num_kv_heads * head_dim] with row strides.
void write_kv(const KvPoolView& pool, std::span<const kv::PageRef> table, int32_t first_token,
              int32_t n, const float* k, int64_t k_stride, const float* v, int64_t v_stride);

// Quantizes and stores the K and V of n consecutive tokens into the 16-bit slots `writes` lists
// (in token order; their counts sum to n).
void write_kv_slots(const KvPoolView& pool, std::span<const kv::KvWrite> writes, int32_t n,
                    const float* k, int64_t k_stride, const float* v, int64_t v_stride);

// Dequantizes tokens [0, count) of `table` into k_out and v_out ([count, num_kv_heads * head_dim]).
void read_kv(const KvPoolView& pool, std::span<const kv::PageRef> table, int32_t count,
             float* k_out, float* v_out);

struct AttentionShape {
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t sliding_window;  // 0: none; else key j is visible from query i iff i - j < window
  float scale;             // softmax scale, 1/sqrt(head_dim)
};

// Causal GQA attention of n query rows (token indices first_token .. first_token + n - 1) of one
// sequence over keys/values of tokens [0, first_token + n). q: [n, num_heads * head_dim] with
// stride q_stride; k, v: [first_token + n, num_kv_heads * head_dim]; out: [n, num_heads * head_dim]
// with stride out_stride. Softmax in fp32 with max subtraction, as the eager reference does.
void causal_attention(const AttentionShape& shape, const float* q, int64_t q_stride, int32_t n,
                      int32_t first_token, const float* k, const float* v, float* out,
                      int64_t out_stride);

}  // namespace pmkv::cpu
